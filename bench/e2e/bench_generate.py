"""Generation throughput: new tokens per second with SAM's defaults (5 beams, penalty 1.5),
from pixels and from cached features, tiny and mid-size configurations."""

from __future__ import annotations

import pytest
import torch
from _setup import batch, build, features, realistic_prompts
from benchutil import record_sizes, run_benchmark, sam_sizes

COUNTS = [3, 2]
NEW_TOKENS = 16


@pytest.mark.parametrize("size", ["tiny", "mid"])
@pytest.mark.parametrize("source", ["pixels", "cached"])
def bench_generate(benchmark, size, source):
    if size == "mid" and getattr(benchmark, "disabled", False):
        pytest.skip("mid size is timed only (make bench); the tiny size is the smoke test")
    model = build(size).eval()
    inputs = batch(model, COUNTS, text_len=8)
    record_sizes(benchmark, dtype=inputs["pixel_values"].dtype, image_counts=COUNTS,
                 pixel_values=inputs["pixel_values"].shape, prompt_ids=inputs["input_ids"].shape,
                 new_tokens=NEW_TOKENS, beams=5, **sam_sizes(model.config))
    kw = dict(image_counts=inputs["image_counts"], qformer_input_ids=inputs["qformer_input_ids"],
              input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    if source == "pixels":
        kw["pixel_values"] = inputs["pixel_values"]
    else:
        kw["image_features"] = features(model, inputs["pixel_values"])

    def gen():
        with torch.no_grad():
            return model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    out = run_benchmark(benchmark, gen, rounds=3, warmup_rounds=1)
    assert out.shape == (len(COUNTS), NEW_TOKENS)
    benchmark.extra_info.update(size=size, source=source, beams=5)
    if not getattr(benchmark, "disabled", False):
        benchmark.extra_info["tokens_per_s"] = len(COUNTS) * NEW_TOKENS / benchmark.stats.stats.median


def _generate_before(model, inputs: dict, **kw):
    """`SAM.generate` as it was before prefill-once: HF beam search over embeddings it copies to
    every beam before the prefill, HF's own repetition penalty."""
    with torch.no_grad():
        _, embeds, mask = model._llm_inputs(None, inputs["image_features"], inputs["image_counts"],
                                            inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                                            inputs["input_ids"], inputs["attention_mask"])
        return model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)


@pytest.mark.parametrize("mode", ["hf", "lavis"])
def bench_generate_realistic(benchmark, mode):
    """5-beam generation on the scaled config (real proportions) for 4 realistic prompts (2-5
    images, instructions of 20-128 tokens), `NEW` new tokens each, against the generate of before
    (alternating rounds after a warm-up round each; median of the per-round ratios). Smoke run:
    tiny config."""
    from benchutil import alternating_rounds, benchmarks_disabled, record_ratio

    size = "tiny" if benchmarks_disabled(benchmark) else "scaled"
    model = build(size).eval()
    inputs = realistic_prompts(model) if size == "scaled" else dict(
        zip(("image_features", "image_counts"), (features(model, batch(model, COUNTS)["pixel_values"]), COUNTS)),
        **{k: v for k, v in batch(model, COUNTS, text_len=8).items() if k in ("qformer_input_ids", "input_ids",
                                                                             "attention_mask")},
        qformer_attention_mask=None)
    new = 48 if size == "scaled" else 8
    record_sizes(benchmark, dtype=inputs["image_features"].dtype, image_counts=list(inputs["image_counts"]),
                 image_features=inputs["image_features"].shape, prompt_ids=inputs["input_ids"].shape,
                 new_tokens=new, beams=5, **sam_sizes(model.config))
    benchmark.extra_info.update(size=size, mode=mode)
    if mode == "hf":
        kw = dict(num_beams=5, max_new_tokens=new, min_new_tokens=new, repetition_penalty=1.5)
    else:  # lavis: </s> can end a beam early; min_length keeps every answer `new` tokens long
        kw = dict(num_beams=5, max_length=new + 1, min_length=new + 1, repetition_penalty=1.5)

    def ours():
        with torch.no_grad():
            return model.generate(**inputs, generation_mode=mode, **kw)

    def before():
        return _generate_before(model, inputs, num_beams=5, max_new_tokens=new, min_new_tokens=new,
                                repetition_penalty=1.5)

    if benchmarks_disabled(benchmark):
        out = run_benchmark(benchmark, ours, rounds=1, warmup_rounds=0)
        assert out.shape == (len(inputs["image_counts"]), new)
        return
    rr = alternating_rounds(benchmark, ours, before, rounds=3, warmup_rounds=1)
    tokens = len(inputs["image_counts"]) * new
    benchmark.extra_info.update(size=size, mode=mode, beams=5, new_tokens=new,
                                prompt_tokens=int(inputs["attention_mask"].sum()),
                                tokens_per_s=tokens / rr.fast_median_s, tokens_per_s_before=tokens / rr.other_median_s)
    record_ratio(benchmark, "speedup_vs_before", rr)
    if mode == "lavis":
        _compare_with_list_decoder(benchmark, model, inputs, ours, new, tokens)


def _compare_with_list_decoder(benchmark, model, inputs: dict, ours, new: int, tokens: int) -> None:
    """lavis mode against the list-based decoder it replaced (same ids; host reads of every
    candidate, a DynamicCache appended to and reordered whole each step), both from the same
    cached features: ``speedup_vs_list_decoder`` and its new tokens/s."""
    from benchutil import alternate, record_ratio

    from sam_fast.reference import reference_lavis_generate

    def lists():
        with torch.no_grad():
            _, embeds, mask = model._llm_inputs(None, inputs["image_features"], inputs["image_counts"],
                                                inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                                                inputs["input_ids"], inputs["attention_mask"])
            return reference_lavis_generate(model.language_model, embeds, mask, num_beams=5, max_length=new + 1,
                                            min_length=new + 1, repetition_penalty=1.5)

    rr = alternate(ours, lists, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s_list_decoder"] = tokens / rr.other_median_s
    record_ratio(benchmark, "speedup_vs_list_decoder", rr)
