"""One SAM training step (forward, backward, AdamW on the 4 trainable modules), end to end.

Variants measured side by side: sam_fast from pixels, sam_fast from cached ViT features, and the
released code's schedule (per-image ViT, 2N full Q-former passes per sample, no cache). Ratios
go to ``extra_info`` as ``speedup_vs_released`` (the two sides alternate round by round after a
warm-up round each; median of the per-round ratios, IQR in ``ratio_spread``:
`benchutil.alternating_rounds`); targets (CPU, tiny config): >= 1.5x from
pixels, >= 2x with cached features. Also: samples/s, the step's own peak allocation
(`benchutil.peak_allocated_bytes`: what torch allocates during one step, not the process RSS) and
its ratio to the released step's (``memory_vs_released``), and a breakdown into vision /
Q-W-former / LLM.

Sizes: ``tiny`` (the smoke test), ``mid`` and ``scaled`` (timed only, `make bench`). ``scaled`` is
the vicuna-7b config with every width / 8 and real depths and token counts
(`sam_fast.bench_plan.scaled_config`), run on the seeded realistic batch (B=8, 2-5 images,
instructions 20-128 and answers 8-200 LLM tokens, about a quarter of the LLM positions padding):
its time splits as the 7B model's does, so its ratios are the ones that predict real runs. A
released step takes ~20 s there on a CPU: 3 alternating rounds after 1 warm-up round per side (2
rounds without warm-up read 1.21x / 1.39x where a side-by-side script with warm-up read 1.50x /
1.86x: the unwarmed first round pays allocation and first-touch on one side only), a 1-round
breakdown; about 1.6x the time of the 2-round run.
"""

from __future__ import annotations

import pytest
import torch
from _setup import (batch, build, features, optimizer, realistic, realistic_padding, step_cached, step_released,
                    step_sam_fast)
from benchutil import (alternating_rounds, peak_allocated_bytes, record_ratio, record_sizes, run_benchmark, sam_sizes,
                       timed)

from sam_fast.bench_plan import flop_shares, realistic_shapes
from sam_fast.models.packing import packed_lm_loss
from sam_fast.ops import linear_cross_entropy

COUNTS = [4, 4, 2, 1]
# rounds / warm-up rounds of the timed step, rounds of the breakdown
ROUNDS = {"tiny": (5, 1, 3), "mid": (5, 1, 3), "scaled": (3, 1, 1)}


def _inputs(size: str, model):
    """The batch a size is measured on: the realistic mix for ``scaled``, COUNTS otherwise."""
    return realistic(model) if size == "scaled" else batch(model, COUNTS)


def _breakdown(model, inputs, cached, rounds: int = 3) -> dict:
    """Seconds of one step's parts: frozen ViT forward, Q/W-former fwd+bwd, LLM fwd+bwd."""
    kw = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask", "labels")}

    def qw():
        model.encode_images(image_features=cached, **kw).sum().backward()

    with torch.no_grad():
        visual = model.encode_images(image_features=cached, **kw)
    visual.requires_grad_(True)

    def llm():
        ids = inputs["input_ids"]
        ph = model._placeholders(ids, inputs["image_counts"])
        emb = model.get_input_embeddings()(ids.masked_fill(ph, 0)).masked_scatter(ph.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        if model.config.packed_loss:  # as SAM.forward runs it: packed tokens, loss without logits
            packed_lm_loss(model.language_model, emb, inputs["attention_mask"], inputs["labels"],
                           loss_fn=lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum")).backward()
        else:
            model.language_model(inputs_embeds=emb, attention_mask=inputs["attention_mask"],
                                 labels=inputs["labels"]).loss.backward()

    warmup = 2 if rounds > 1 else 0
    out = {"vision": timed(lambda: features(model, inputs["pixel_values"]), warmup=warmup, rounds=rounds),
           "qwformer": timed(qw, warmup=warmup, rounds=rounds), "llm": timed(llm, warmup=warmup, rounds=rounds)}
    total = sum(out.values())
    out.update({f"{part}_share": t / total for part, t in list(out.items())})
    return out


@pytest.mark.parametrize("size", ["tiny", "mid", "scaled"])
@pytest.mark.parametrize("variant", ["sam_fast", "cached", "released"])
def bench_train_step(benchmark, size, variant):
    if size != "tiny" and getattr(benchmark, "disabled", False):
        pytest.skip(f"{size} size is timed only (make bench); the tiny size is the smoke test")
    rounds, warmup, breakdown_rounds = ROUNDS[size]
    model = build(size).train()
    opt = optimizer(model)
    inputs = _inputs(size, model)
    counts = inputs["image_counts"]
    cached = features(model, inputs["pixel_values"])
    steps = {"sam_fast": lambda: step_sam_fast(model, opt, inputs),
             "cached": lambda: step_cached(model, opt, inputs, cached),
             "released": lambda: step_released(model, opt, inputs)}
    record_sizes(benchmark, dtype=inputs["pixel_values"].dtype, image_counts=list(counts),
                 pixel_values=inputs["pixel_values"].shape, input_ids=inputs["input_ids"].shape,
                 **sam_sizes(model.config))
    benchmark.extra_info.update(size=size, variant=variant, images=sum(counts), samples=len(counts),
                                llm_tokens=int(inputs["attention_mask"].sum()),
                                llm_padding=float(1 - inputs["attention_mask"].float().mean()))
    if size == "scaled":  # analytic FLOP shares of this batch (vit / qwformer / llm_forward / llm_backward)
        benchmark.extra_info.update(realistic_padding=realistic_padding(), flop_shares=flop_shares(
            model.config, realistic_shapes(0), "released" if variant == "released" else "sam_fast"))
    if getattr(benchmark, "disabled", False) or variant == "released":
        loss = run_benchmark(benchmark, steps[variant], rounds=rounds, warmup_rounds=warmup)
        assert torch.isfinite(loss)
        if getattr(benchmark, "disabled", False):
            return  # smoke run: one call, no side measurements
    else:  # the released schedule alternates with ours round by round; median of the per-round ratios
        record_ratio(benchmark, "speedup_vs_released", alternating_rounds(
            benchmark, steps[variant], steps["released"], rounds=rounds, warmup_rounds=warmup))
    median = benchmark.stats.stats.median
    benchmark.extra_info["samples_per_s"] = len(counts) / median
    if variant == "sam_fast":
        benchmark.extra_info["breakdown"] = _breakdown(model, inputs, cached, breakdown_rounds)
    peak = peak_allocated_bytes(steps[variant])
    benchmark.extra_info["peak_step_alloc_mb"] = peak / 2**20
    if variant != "released":
        benchmark.extra_info["memory_vs_released"] = peak / peak_allocated_bytes(steps["released"])
