"""The frozen LLM's part of a training step, packed (padding-free) vs padded.

Forward plus the input-gradient backward of the frozen LLaMA (weights frozen, as in SAM training)
with the next-token loss, on the seeded realistic batch (`sam_fast.bench_plan.realistic_shapes`:
B=8, per sample 32 query tokens x 2-5 images, instruction 20-128 and answer 8-200 tokens, right-
padded; about a quarter of the positions are padding). ``padded`` is HF's
``LlamaForCausalLM(inputs_embeds, attention_mask, labels).loss`` (what `SAM.forward` runs today);
``packed`` is `sam_fast.models.packing.packed_lm_loss` (padding removed, per-sample varlen causal
attention, lm_head at supervised positions only: the logits are ~2% of the FLOPs here, so the
ratio is the padding's). The two sides alternate round by round after a warm-up round each
(`benchutil.alternating_rounds`); ``speedup_packed_vs_padded`` is the median of the per-round
ratios, ``padding_bound`` the ratio of padded positions to real tokens (what removing padding can
give at most), ``cpu_time_ratio`` (CPU only) the same ratio in process CPU time, which other jobs
on a shared machine disturb less.
Target >= 1.25x.

Sizes: ``tiny`` (the smoke test, also checks both sides give the same loss) and ``scaled``
(`sam_fast.bench_plan.scaled_config`'s LLM: hidden 512, 32 layers, FFN 1376, vocab 4000; timed
only, `make bench`; a padded round takes ~25 s on one CPU thread, hence 3 rounds, 1 warm-up).
CPU runs use one thread (see `one_cpu_thread`).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from benchutil import alternating_rounds, device_name, record_ratio, record_sizes, run_benchmark
from transformers import LlamaConfig, LlamaForCausalLM

from sam_fast.bench_plan import realistic_shapes, scaled_config
from sam_fast.models.packing import packed_lm_loss, packing_backend

QUERY_TOKENS = 32
ROUNDS = {"tiny": (3, 1), "scaled": (3, 1)}  # rounds, warm-up rounds


def _llm(size: str) -> LlamaForCausalLM:
    if size == "scaled":
        config = scaled_config().text_config
    else:
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def _batch(model: LlamaForCausalLM, seed: int = 0) -> dict:
    """Right-padded embeddings, mask and labels (on the answers) of the realistic mix."""
    shapes = realistic_shapes(seed)
    lengths = [s.llm_tokens(QUERY_TOKENS) for s in shapes]
    B, S, H = len(lengths), max(lengths), model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, S, H, generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100)
    for b, (n, s) in enumerate(zip(lengths, shapes)):
        mask[b, :n] = 1
        labels[b, n - s.answer : n] = torch.randint(4, model.config.vocab_size, (s.answer,), generator=g)
    embeds[~mask.bool()] = 0
    return dict(embeds=embeds, attention_mask=mask, labels=labels)


def _steps(model, batch):
    def padded():
        e = batch["embeds"].clone().requires_grad_(True)
        loss = model(inputs_embeds=e, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        return loss.detach()

    def packed():
        e = batch["embeds"].clone().requires_grad_(True)
        loss = packed_lm_loss(model, e, batch["attention_mask"], batch["labels"])
        loss.backward()
        return loss.detach()

    return packed, padded


@pytest.fixture
def one_cpu_thread(benchmark):
    """Time on one CPU thread (the issue's measurements are single-threaded): on a shared 2-core
    machine a 2-thread OpenMP run slows down many times over whenever another job holds a core,
    while one thread keeps its pace."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark.extra_info.update(threads=1, device=device_name())
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("size", ["tiny", "scaled"])
def bench_llm_packing(benchmark, size, one_cpu_thread):
    disabled = getattr(benchmark, "disabled", False)
    if size != "tiny" and disabled:
        pytest.skip(f"{size} size is timed only (make bench); the tiny size is the smoke test")
    model = _llm(size)
    batch = _batch(model)
    packed, padded = _steps(model, batch)
    mask = batch["attention_mask"]
    tokens, positions = int(mask.sum()), mask.numel()
    cfg = model.config
    record_sizes(benchmark, dtype=batch["embeds"].dtype, embeds=batch["embeds"].shape, llm_hidden=cfg.hidden_size,
                 llm_layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads)
    backend, why = packing_backend(batch["embeds"].device, batch["embeds"].dtype,
                                   model.config.hidden_size // model.config.num_attention_heads)
    benchmark.extra_info.update(size=size, samples=mask.shape[0], llm_tokens=tokens, padded_positions=positions,
                                llm_padding=1 - tokens / positions, padding_bound=positions / tokens,
                                attention_backend=backend, attention_backend_reason=why)
    rounds, warmup = ROUNDS[size]
    if disabled:  # smoke run: one call, and both sides agree
        loss = run_benchmark(benchmark, packed, rounds=1, warmup_rounds=0)
        torch.testing.assert_close(loss, padded(), rtol=1e-4, atol=0)
        return
    cpu = {"packed": [], "padded": []}
    rr = alternating_rounds(benchmark, _cpu_timed(packed, cpu["packed"]), _cpu_timed(padded, cpu["padded"]),
                            rounds=rounds, warmup_rounds=warmup)
    record_ratio(benchmark, "speedup_packed_vs_padded", rr)
    benchmark.extra_info.update(packed_s=rr.fast_median_s, padded_s=rr.other_median_s)
    if not torch.cuda.is_available():  # CPU time is steadier than wall time on a shared machine
        benchmark.extra_info["cpu_time_ratio"] = statistics.median(
            pd / pk for pd, pk in zip(cpu["padded"][-rounds:], cpu["packed"][-rounds:], strict=True))


def _cpu_timed(fn, times: list):
    """`fn`, recording the process CPU seconds of each call into `times`."""

    def call():
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
        return out

    return call
