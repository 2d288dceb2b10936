"""The fused Q-former cross-attention (sam_fast.ops.cross_attention_streams on its Triton backend)
against PyTorch's `scaled_dot_product_attention`, at the Q-former's shape: B=2 samples of N=4
images, 32 query rows x 12 heads x head dim 64 per image and stream, 257 image tokens.

- both streams, materialised K/V (shared mode, or leave_one_out off the fused path): one launch
  against one SDPA call per stream (the reference backend);
- leave_one_out with the mixing plan: K/V tiles formed in the kernel from the images' K/V and the
  softmax weights, against materialising the merged K/V (`mix_kv`) and running SDPA; forward,
  and forward + backward (the training case: gradients of the queries and the weights).

These run on CUDA only: on CPU the kernel runs only under the Triton interpreter, which is a
correctness tool (milliseconds per program), not something to time. Ratios go to extra_info as
``speedup_*``: the two sides alternate round by round after warm-up rounds, median of the
per-round ratios (IQR in ``ratio_spread``).
"""

from __future__ import annotations

import pytest
import torch

from benchutil import alternate, alternating_rounds, benchmarks_disabled, record_ratio, record_sizes, run_benchmark
from sam_fast.ops import cross_attention_streams, cross_attention_streams_ref, mix_kv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the fused kernel runs on CUDA; on CPU only the interpreter (not timed)")

B, N, Q, H, d, P = 2, 4, 32, 12, 64, 257
T = B * N


def _inputs(dtype, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2 * T, H, Q, d, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)
    # the K/V of one cross layer as strided views of a [T, P, 2*H*d] projection, like the model's
    buf = torch.randn(T, P, 2 * H * d, device="cuda", dtype=dtype, generator=g)
    k = buf[..., : H * d].unflatten(-1, (H, d)).transpose(1, 2)
    v = buf[..., H * d:].unflatten(-1, (H, d)).transpose(1, 2)
    # leave_one_out plan: the other N-1 images of the sample, softmax weights per key
    index = torch.tensor([[m for m in range(b * N, (b + 1) * N) if m != i] for b in range(B)
                          for i in range(b * N, (b + 1) * N)], device="cuda")
    scores = torch.randn(T, N - 1, P, device="cuda", generator=g).requires_grad_(requires_grad)
    return q, k, v, index, scores


def _record(benchmark, **ratios):
    benchmark.extra_info.update({k: round(v, 3) for k, v in ratios.items()})
    print(" ".join(f"{k}={v:.3g}" for k, v in ratios.items()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def bench_cross_attention_streams_vs_sdpa(benchmark, dtype):
    q, k, v, _, _ = _inputs(dtype)
    record_sizes(benchmark, dtype=dtype, B=B, N=N, queries=Q, heads=H, head_dim=d, image_tokens=P, q=q.shape,
                 kv=k.shape)
    k2, v2 = k.contiguous(), v.contiguous()  # materialised merged K/V of the W-stream
    with torch.no_grad():
        fused = lambda: cross_attention_streams(q, k, v, k2, v2)  # noqa: E731
        if benchmarks_disabled(benchmark):
            run_benchmark(benchmark, fused)
            return
        rr = alternating_rounds(benchmark, fused, lambda: cross_attention_streams_ref(q, k, v, k2, v2), rounds=20,
                                warmup_rounds=2)
    _record(benchmark, speedup_vs_sdpa=record_ratio(benchmark, "speedup_vs_sdpa", rr), fused_us=rr.fast_median_s * 1e6,
            sdpa_us=rr.other_median_s * 1e6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def bench_cross_attention_leave_one_out_mix(benchmark, dtype, backward):
    q, k, v, index, scores = _inputs(dtype, requires_grad=backward)
    record_sizes(benchmark, dtype=dtype, B=B, N=N, queries=Q, heads=H, head_dim=d, image_tokens=P, q=q.shape,
                 kv=k.shape, mix_weights=scores.shape)

    def run(streams_fn, materialise):
        w = torch.softmax(scores, 1)
        if materialise:
            k2, v2 = mix_kv(k, v, (index, w))
            out = streams_fn(q, k, v, k2, v2)
        else:
            out = streams_fn(q, k, v, k, v, mix=(index, w))
        if backward:
            torch.autograd.grad(out.float().sum(), (q, scores))
        return out

    fused = lambda: run(cross_attention_streams, False)  # noqa: E731
    with torch.set_grad_enabled(backward):
        if benchmarks_disabled(benchmark):
            run_benchmark(benchmark, fused)
            return
        sdpa = alternating_rounds(benchmark, fused, lambda: run(cross_attention_streams_ref, True), rounds=20,
                                  warmup_rounds=2)
        mat = alternate(fused, lambda: run(cross_attention_streams, True), rounds=20, warmup_rounds=2)
    merged_mb = 2 * T * P * H * d * q.element_size() / 2**20  # merged K/V of this layer, never allocated
    _record(benchmark, speedup_vs_materialise_sdpa=record_ratio(benchmark, "speedup_vs_materialise_sdpa", sdpa),
            speedup_vs_materialise_fused=record_ratio(benchmark, "speedup_vs_materialise_fused", mat),
            merged_kv_mb_avoided=merged_mb, fused_us=sdpa.fast_median_s * 1e6, sdpa_us=sdpa.other_median_s * 1e6,
            fused_materialised_us=mat.other_median_s * 1e6)
