"""Generation throughput: new tokens per second with SAM's defaults (5 beams, penalty 1.5),
from pixels and from cached features, tiny and mid-size configurations."""

from __future__ import annotations

import pytest
import torch
from _setup import batch, build, features
from benchutil import run_benchmark

COUNTS = [3, 2]
NEW_TOKENS = 16


@pytest.mark.parametrize("size", ["tiny", "mid"])
@pytest.mark.parametrize("source", ["pixels", "cached"])
def bench_generate(benchmark, size, source):
    if size == "mid" and getattr(benchmark, "disabled", False):
        pytest.skip("mid size is timed only (make bench); the tiny size is the smoke test")
    model = build(size).eval()
    inputs = batch(model, COUNTS, text_len=8)
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
