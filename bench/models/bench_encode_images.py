"""`SAM.encode_images` against the released code's schedule (2N full Q-former passes per sample,
`sam_fast.reference.released_schedule_encode_images`), same weights, same inputs.

Real Q-former size (BERT-base: 12 layers, hidden 768, 12 heads, cross-attention every 2nd layer,
encoder width 1408, 32 queries), cached features P=257 x D=1408, B=2 samples of N images,
instruction of 32 tokens, fp32, eval mode, random weights. Targets (at N=4): >= 1.6x in
shared mode, >= 1.25x in leave_one_out. The ratio (median of the per-round ratios of the two sides
timed alternately after a warm-up round each; IQR in ``ratio_spread``) is stored in
``extra_info["speedup_vs_released"]`` and printed.

With ``--benchmark-disable`` (CI smoke run) only N=2 runs, once per side, and the two sides are
compared for equality at the real size.

``bench_merge_kv_vs_features`` measures the choice explained in docs/model.md#adaptive-adjustment:
re-weighting the images' K/V (what the model does) against re-weighting the 1408-wide features and
projecting the merged maps.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import InstructBlipVisionConfig, LlamaConfig

from sam_fast import SAM, SAMConfig
from sam_fast.modules import merged_context_kv, merged_context_maps, project_cross_kv
from sam_fast.reference import released_schedule_encode_images


from benchutil import alternating_rounds, benchmarks_disabled, record_ratio, record_sizes, run_benchmark  # bench/

B, P, D, TEXT = 2, 257, 1408, 32


def make_model() -> SAM:
    """Full-size Q-former and guidance modules; a 1-layer ViT and a 1-layer 4096-wide LLM (SAMConfig
    refuses 0 layers) stand in for the parts encode_images does not run on cached features."""
    vision = InstructBlipVisionConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=16, image_size=224, patch_size=14)
    text = LlamaConfig(vocab_size=64, hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=1, head_dim=8)
    cfg = SAMConfig.instructblip_vicuna7b(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                          image_token_index=3)
    torch.manual_seed(0)
    m = SAM(cfg).eval()
    with torch.no_grad():
        m.query_tokens.normal_(0, 0.5)
        for mod in (m.adaptive_adjustment, m.guidance_in, m.guidance_out):
            mod.weight.normal_(0, 0.02)
            mod.bias.normal_(0, 0.02)
    return m


@pytest.fixture(scope="module")
def model() -> SAM:
    return make_model()


def inputs(model: SAM, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B * n, P, D, generator=g)
    ids = torch.randint(5, model.config.qformer_config.vocab_size, (B, TEXT), generator=g)
    return feats, [n] * B, ids


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("context_mode", ["shared", "leave_one_out"])
def bench_encode_images(benchmark, model, context_mode, n):
    disabled = benchmarks_disabled(benchmark)
    if disabled and n != 2:
        pytest.skip("smoke run (--benchmark-disable): N=2 only")
    model.config.context_mode = context_mode
    feats, counts, ids = inputs(model, n)
    q = model.config.qformer_config
    record_sizes(benchmark, dtype=feats.dtype, B=B, N=n, image_features=feats.shape, qformer_input_ids=ids.shape,
                 qformer_layers=q.num_hidden_layers, qformer_hidden=q.hidden_size,
                 query_tokens=model.config.num_query_tokens)

    @torch.no_grad()
    def fast():
        return model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids)

    @torch.no_grad()
    def released():
        return released_schedule_encode_images(model, feats, counts, ids)

    if disabled:
        ours = run_benchmark(benchmark, fast)
        theirs = released()
        assert (ours - theirs).abs().max().item() <= 1e-4
        return
    # The two sides alternate round by round; the ratio is the median of the per-round ratios. On
    # a busy machine other jobs inflate the released schedule's many small GEMMs more than ours
    # (2026-11-22: per-round ratios 1.5-2x above quiet runs): a wide IQR and the run's busy-machine
    # warning (bench/conftest.py) flag such runs.
    rr = alternating_rounds(benchmark, fast, released, rounds=3 if n >= 8 else 5)
    speedup = record_ratio(benchmark, "speedup_vs_released", rr)
    benchmark.extra_info.update(
        context_mode=context_mode, N=n, images_per_sample=n, B=B, released_s=rr.other_median_s,
        encode_images_s=rr.fast_median_s, target=1.6 if context_mode == "shared" else 1.25,
    )
    print(f"\nencode_images {context_mode} B={B} N={n}: released {rr.other_median_s:.3f}s, ours "
          f"{rr.fast_median_s:.3f}s (median rounds), speedup {speedup:.2f}x (median of per-round ratios)")


@pytest.mark.parametrize("context_mode", ["shared", "leave_one_out"])
def bench_merge_kv_vs_features(benchmark, model, context_mode):
    """Cost of the W-stream's K/V (N=4): re-weight the K/V [T, P, 9216] (ours) vs re-weight the
    features [T, P, 1408] and project each merged map (the alternative)."""
    n = 2 if benchmarks_disabled(benchmark) else 4
    feats, counts, _ = inputs(model, n)
    record_sizes(benchmark, dtype=feats.dtype, B=B, N=n, image_features=feats.shape)
    layers = model.qformer.encoder.layer
    cu = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32)
    kv = project_cross_kv(layers, feats).buffer
    aa = model.adaptive_adjustment

    @torch.no_grad()
    def via_kv():
        return merged_context_kv(feats, kv, aa, cu, context_mode, "adaptive")

    @torch.no_grad()
    def via_features():
        return project_cross_kv(layers, merged_context_maps(feats, aa, cu, context_mode, "adaptive")).buffer

    if benchmarks_disabled(benchmark):
        a = run_benchmark(benchmark, via_kv, rounds=5, warmup_rounds=1)
        torch.testing.assert_close(a, via_features(), rtol=1e-4, atol=1e-4)
        return
    rr = alternating_rounds(benchmark, via_kv, via_features, rounds=5, warmup_rounds=1)
    ratio = record_ratio(benchmark, "speedup_kv_vs_features", rr)
    t_kv, t_features = rr.fast_median_s, rr.other_median_s
    benchmark.extra_info.update(context_mode=context_mode, N=n, kv_s=t_kv, features_s=t_features)
    print(f"\nW-stream K/V {context_mode} N={n}: re-weight K/V {t_kv * 1e3:.1f} ms, "
          f"re-weight features + project {t_features * 1e3:.1f} ms ({ratio:.2f}x)")
