"""Context re-weighting (sam_fast.ops.context_reweight) against its baselines, CPU fp32 at the
shape B=4, N=8, P=257, D=1408 (EVA ViT-g width) with given fp32 scores [B*N, P], as the model
calls it, measured side by side in one run:

- leave_one_out vs a naive einsum version (masked softmax over an [N, N, P] logit tensor,
  einsum('imp,mpd->ipd')): target >= 4x faster;
- leave_one_out vs copying a tensor of the output's size into a preallocated buffer (the memory
  traffic floor): target <= 1.5x the copy's time;
- shared vs the released code's form (softmax over the image axis of the scores, broadcast
  multiply, sum): target >= 3x faster;
- per-image cost from N=2 to N=16 (should be flat);
- forward + backward (score grads, frozen values: the training case, where the scores come from
  the trainable Adaptive Adjustment and the K/V from frozen layers) vs autograd through the naive
  version;
- the 7B model's own call (`bench_context_reweight_model_kv`): the images' cross-attention K/V
  [T=30, P=257, C=9216] (6 cross layers x K, V x 768 channels, 30 images in 8 samples) merged with
  given fp32 scores, bf16 and fp32, both modes: many calls back to back (device time per call) and
  the host time per call apart, the bytes moved per call and the HBM floor on an H200 (4.8 TB/s).

Ratios go to benchmark.extra_info (and are printed): each side pair alternates round by round
after warm-up rounds, the ratio is the median of the per-round ratios (IQR in ``ratio_spread``).
The per-image sweep's ``ratio_N16_vs_N2`` compares one op at two sizes, timed one after the other.
With --benchmark-disable every benchmark is one call (a smoke test) and no ratio is measured.
"""

from __future__ import annotations

import pytest
import torch

from benchutil import (alternate, alternating_rounds, back_to_back, benchmarks_disabled, record_ratio, record_sizes,
                       run_benchmark, timed)
from sam_fast.ops import context_reweight

B, N, P, D = 4, 8, 257, 1408


def inputs(n=N, b=B, p=P, d=D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(b * n, p, d, generator=g)
    s = torch.randn(b * n, p, generator=g).requires_grad_(requires_grad)
    cu = torch.arange(0, b * n + 1, n, dtype=torch.int32)
    return F, s, cu


def naive_leave_one_out(F, scores, n):
    """Equal-size samples: [N, N, P] masked logits, softmax, einsum."""
    x = F.view(-1, n, *F.shape[1:])  # [B, N, P, D]
    s = scores.view(-1, n, F.shape[1])  # [B, N, P]
    eye = torch.eye(n, dtype=torch.bool)[None, :, :, None]
    logits = s[:, None].expand(-1, n, n, -1).masked_fill(eye, float("-inf"))  # [B, i, m, P]
    a = torch.softmax(logits, dim=2)
    return torch.einsum("bimp,bmpd->bipd", a, x).reshape(F.shape)


def released_shared(F, scores, n):
    """The released code's form: softmax of the scores over the image axis, multiply, sum."""
    x = F.view(-1, n, *F.shape[1:])
    a = torch.softmax(scores.view(-1, n, F.shape[1]), dim=1)  # [B, N, P]
    return (a[..., None] * x).sum(1)


def _sizes(benchmark, F, n=N, **more):
    record_sizes(benchmark, dtype=F.dtype, features=F.shape, B=F.shape[0] // n, N=n, P=F.shape[1], D=F.shape[2],
                 **more)


def _record(benchmark, **ratios):
    benchmark.extra_info.update({k: round(v, 3) for k, v in ratios.items()})
    print(" ".join(f"{k}={v:.3g}" for k, v in ratios.items()))


def _record_pair(benchmark, key, rr, **more):
    """Store one alternating comparison (`record_ratio`) and print it with `more` figures."""
    _record(benchmark, **{key: record_ratio(benchmark, key, rr)}, **more)


def bench_context_reweight_leave_one_out(benchmark):
    F, s, cu = inputs()
    _sizes(benchmark, F)
    with torch.no_grad():
        fast = lambda: context_reweight(F, s, cu, "leave_one_out")  # noqa: E731
        if benchmarks_disabled(benchmark):
            run_benchmark(benchmark, fast)
            return
        naive = alternating_rounds(benchmark, fast, lambda: naive_leave_one_out(F, s, N), rounds=7, warmup_rounds=2)
        dst = torch.empty_like(F)
        copy = alternate(fast, lambda: dst.copy_(F), rounds=7, warmup_rounds=2)
    t_fast, t_copy = copy.fast_median_s, copy.other_median_s
    nbytes = 2 * F.numel() * F.element_size()  # read the features once, write an output of the same size
    record_ratio(benchmark, "speedup_vs_output_copy", copy)
    _record_pair(benchmark, "speedup_vs_naive_einsum", naive, time_vs_output_copy=1 / copy.ratio,
                 speedup_vs_output_copy=copy.ratio, gbps=nbytes / t_fast / 1e9, copy_gbps=nbytes / t_copy / 1e9,
                 fast_ms=naive.fast_median_s * 1e3, naive_ms=naive.other_median_s * 1e3, copy_ms=t_copy * 1e3)


def bench_context_reweight_shared(benchmark):
    F, s, cu = inputs()
    _sizes(benchmark, F)
    with torch.no_grad():
        fast = lambda: context_reweight(F, s, cu, "shared")  # noqa: E731
        if benchmarks_disabled(benchmark):
            run_benchmark(benchmark, fast)
            return
        rr = alternating_rounds(benchmark, fast, lambda: released_shared(F, s, N), rounds=7, warmup_rounds=2)
    _record_pair(benchmark, "speedup_vs_released", rr, fast_ms=rr.fast_median_s * 1e3,
                 released_ms=rr.other_median_s * 1e3)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def bench_context_reweight_per_image(benchmark, mode):
    """Time per image for N = 2, 4, 8, 16 images per sample (B=4): flat means O(n D) per patch."""
    F, s, cu = inputs(n=8)
    _sizes(benchmark, F, n=8, N_per_image_sweep=[2, 4, 8, 16])
    with torch.no_grad():
        run_benchmark(benchmark, lambda: context_reweight(F, s, cu, mode))
        if benchmarks_disabled(benchmark):
            return
        per_image = {}
        for n in (2, 4, 8, 16):
            F, s, cu = inputs(n=n)
            per_image[n] = timed(lambda: context_reweight(F, s, cu, mode)) / (B * n)  # noqa: B023
    _record(benchmark, **{f"us_per_image_N{n}": t * 1e6 for n, t in per_image.items()},
            ratio_N16_vs_N2=per_image[16] / per_image[2])


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def bench_context_reweight_backward(benchmark, mode):
    """Forward + backward to the scores (frozen values) vs autograd through the naive form."""
    F, s, cu = inputs(requires_grad=True)
    _sizes(benchmark, F)
    naive = naive_leave_one_out if mode == "leave_one_out" else released_shared

    def fast():
        out = context_reweight(F, s, cu, mode)
        return torch.autograd.grad(out, s, torch.ones_like(out))

    def slow():
        out = naive(F, s, N)
        return torch.autograd.grad(out, s, torch.ones_like(out))

    if benchmarks_disabled(benchmark):
        run_benchmark(benchmark, fast, rounds=3, warmup_rounds=1)
        return
    rr = alternating_rounds(benchmark, fast, slow, rounds=3, warmup_rounds=1)
    _record_pair(benchmark, "speedup_fwd_bwd_vs_naive_autograd", rr, fast_ms=rr.fast_median_s * 1e3,
                 naive_ms=rr.other_median_s * 1e3)


# The 7B model: 30 images in 8 samples (the GPU check's training batch), 257 image tokens, the K/V
# of 6 cross-attention layers x (K, V) x 768 channels.
MODEL_COUNTS, MODEL_P, MODEL_C = (5, 4, 4, 4, 4, 3, 3, 3), 257, 9216
HBM_BYTES_PER_S = 4.8e12  # H200


def model_inputs(dtype, device):
    """(K/V [30, 257, 9216] of `dtype`, fp32 scores [30, 257], cu_images, host offsets)."""
    g = torch.Generator().manual_seed(0)
    T = sum(MODEL_COUNTS)
    F = torch.randn(T, MODEL_P, MODEL_C, generator=g).to(device, dtype)
    s = torch.randn(T, MODEL_P, generator=g).to(device)
    offsets = [0, *torch.tensor(MODEL_COUNTS).cumsum(0).tolist()]
    return F, s, torch.tensor(offsets, dtype=torch.int32, device=device), offsets


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def bench_context_reweight_model_kv(benchmark, dtype, mode):
    """The model's call, forward (the merged K/V of every training step). Records the device time
    per call of back-to-back calls, the host time per call, GB/s, and the floor: bytes moved (the
    K/V read once, the output written once) / HBM bandwidth."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    F, s, cu, offsets = model_inputs(dtype, device)
    rows = len(MODEL_COUNTS) if mode == "shared" else F.shape[0]
    nbytes = (F.shape[0] + rows) * MODEL_P * MODEL_C * F.element_size()
    record_sizes(benchmark, dtype=dtype, features=F.shape, counts=list(MODEL_COUNTS), P=MODEL_P, C=MODEL_C,
                 bytes_moved=nbytes)
    with torch.no_grad():
        fn = lambda: context_reweight(F, s, cu, mode, offsets=offsets)  # noqa: E731
        run_benchmark(benchmark, fn, rounds=3, warmup_rounds=1)
        if benchmarks_disabled(benchmark):
            return
        calls, rounds = (50, 5) if device == "cuda" else (3, 3)  # (a CPU call takes ~0.1 s)
        bb = back_to_back(fn, calls=calls, rounds=rounds)
        dst = torch.empty(rows, MODEL_P, MODEL_C, dtype=dtype, device=device)
        src = F[:rows]
        copy = back_to_back(lambda: dst.copy_(src), calls=calls, rounds=rounds)
    copy_bytes = 2 * dst.numel() * dst.element_size()
    _record(benchmark, device_us_per_call=bb.device_s * 1e6, host_us_per_call=bb.host_s * 1e6,
            gbps=nbytes / bb.device_s / 1e9, copy_gbps=copy_bytes / copy.device_s / 1e9,
            h200_hbm_floor_us=nbytes / HBM_BYTES_PER_S * 1e6, calls_back_to_back=calls)
