"""Part B, contextual semantic generation: the Adaptive Adjustment that builds the merged
contextual features I-hat which the W-stream cross-attends to (`merged_context_maps`), or directly
the cross-attention K/V of I-hat (`merged_context_kv`, what the model uses on CPU and in shared
mode), or, in leave_one_out mode on the fused attention kernel, only the weights of I-hat
(`leave_one_out_mix`): the kernel forms I-hat's K/V tiles from the images' K/V as it needs them."""

from __future__ import annotations

import torch
from torch import nn

from sam_fast.modules.plans import device_tensor
from sam_fast.ops import context_reweight


def merged_context_maps(
    features: torch.Tensor,
    adaptive_adjustment: nn.Linear,
    cu_images: torch.Tensor,
    context_mode: str,
    guidance: str,
) -> torch.Tensor:
    """I-hat for every image (leave_one_out, [T, P, D]) or every sample (shared, [B, P, D]).

    ``alpha_{m,j} = softmax_m(Linear(I_{m,j}))`` over the images of a sample per patch j
    (``guidance="adaptive"``), or uniform weights (``guidance="mean"``).
    """
    if guidance == "adaptive":
        weight, bias = adaptive_adjustment.weight, adaptive_adjustment.bias
    elif guidance == "mean":
        weight, bias = None, None
    else:
        raise ValueError(f"merged_context_maps: guidance={guidance!r} has no merged maps")
    return context_reweight(features, weight, bias, cu_images, context_mode)


def merged_context_kv(
    features: torch.Tensor,
    kv_scratch: torch.Tensor,
    adaptive_adjustment: nn.Linear,
    cu_images: torch.Tensor,
    context_mode: str,
    guidance: str,
    kv_width: int | None = None,
    offsets: list[int] | None = None,
) -> torch.Tensor:
    """The cross-attention K/V of I-hat from the K/V of the images: [T, P, W] (leave_one_out)
    or [B, P, W] (shared), merged K/V in ``[..., :C]``.

    `kv_scratch` [T, P, W] holds the K/V of the features E [T, P, D] in ``[..., :C]``, C =
    `kv_width` (default W - 1), and scratch columns after them (``project_cross_kv(...,
    scratch=True)``); column C is overwritten with the Adaptive Adjustment scores ``s = Linear(E)``.
    `offsets`: host copy of cu_images (see `context_reweight`).

    Exact, not an approximation: K/V are affine in E (``K = E W_k^T + b_k``) and the weights
    ``alpha_{m,j}`` of a merged map sum to 1 over m, so ``sum_m alpha_{m,j} K_m[j] =
    (sum_m alpha_{m,j} E_m[j]) W_k^T + b_k``, the K of I-hat. (A one-image leave_one_out sample
    has no weights and a zero map; it gets no W-stream row, so that row is unused.)

    Why the K/V and not the 1408-wide features: merging the features and then projecting I-hat
    costs one more ``[P, D] x [D, n_cross*2*H]`` GEMM per merged map (the K/V projections are 36 %
    of a Q-former pass at the real sizes); merging the K/V is a memory-bound weighted sum over a 6.5x wider
    row. Measured (``bench_merge_kv_vs_features`` in `bench/models/bench_encode_images.py`, real
    sizes, B=2, N=4, fp32, 2-core dev CPU under load, 2026-11-22): K/V 31 ms vs features + projection
    457 ms in shared mode, 71 ms vs 1312 ms in leave_one_out.

    `context_reweight` computes its scores from its own input, so the scores ride in the scratch
    column and a one-hot weight picks them (``s * 1 + 0 * K = s`` exactly); the gradient reaches
    s, hence the Adaptive Adjustment Linear.
    """
    C = kv_scratch.shape[-1] - 1 if kv_width is None else kv_width
    if not 0 <= C < kv_scratch.shape[-1]:
        raise ValueError(f"merged_context_kv: kv_width={C} leaves no scratch column in {tuple(kv_scratch.shape)}")
    if guidance == "mean":
        return context_reweight(kv_scratch, None, None, cu_images, context_mode, offsets=offsets)
    if guidance != "adaptive":
        raise ValueError(f"merged_context_kv: guidance={guidance!r} has no merged maps")
    acc = torch.promote_types(features.dtype, torch.float32)
    # The weight is copied into fresh (allocator-aligned) memory: a memory-mapped checkpoint can
    # leave it misaligned, and the vectorised product then rounds differently (bitwise-equal
    # outputs for equal weights are tested).
    w = adaptive_adjustment.weight.reshape(-1).to(acc).clone()
    scores = (features.to(acc) @ w + adaptive_adjustment.bias.to(acc)).unsqueeze(-1)
    kv_scratch[..., C:C + 1] = scores.to(kv_scratch.dtype)
    # one-hot on column C, built on the device without writing a host scalar into it (that write
    # synchronised with the GPU, found by CUDA's sync debug mode on an H200)
    pick = (torch.arange(kv_scratch.shape[-1], device=kv_scratch.device) == C).to(kv_scratch.dtype)
    return context_reweight(kv_scratch, pick, None, cu_images, context_mode, offsets=offsets)


def leave_one_out_mix(
    features: torch.Tensor,
    adaptive_adjustment: nn.Linear,
    counts: list[int],
    guidance: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The leave_one_out I-hat of every image that has contextual images, as a mixing plan over
    the images: ``(index [Tw, M], weight [Tw, M, P])`` with M = max(counts) - 1 and Tw the images
    of the samples with more than one image, in image order. Row j (image i of sample b) lists
    the other images m of b in order and ``weight[j, s, p] = softmax_{m != i}(s_m[p])`` with
    ``s = Linear(E)`` (``guidance="adaptive"``) or ``1 / (n_b - 1)`` (``"mean"``); unused slots
    point at image i with weight 0. So ``I-hat_i[p] = sum_s weight[j, s, p] E_{index[j, s]}[p]``
    (`sam_fast.ops.mix_kv`), equal to `context_reweight(..., "leave_one_out")`, and, as in
    `merged_context_kv`, the same weights applied to the images' K/V give I-hat's K/V.

    The index is built on the host from `counts` (no device sync); the scores are computed in
    fp32 (fp64 for fp64 features) and the weights are returned in that dtype, differentiable
    with respect to the Adaptive Adjustment Linear.
    """
    if guidance not in ("adaptive", "mean"):
        raise ValueError(f"leave_one_out_mix: guidance={guidance!r} has no merged maps")
    T, P, _ = features.shape
    if sum(counts) != T or min(counts, default=1) < 1:
        raise ValueError(f"leave_one_out_mix: image counts {counts} do not describe the {T} images of features")
    M = max(counts) - 1
    dev = features.device
    acc = torch.promote_types(features.dtype, torch.float32)
    index, live = [], []
    start = 0
    for n in counts:
        if n > 1:
            for i in range(start, start + n):
                others = [m for m in range(start, start + n) if m != i]
                index.append(others + [i] * (M - len(others)))
                live.append([True] * len(others) + [False] * (M - len(others)))
        start += n
    if not index:
        return (torch.zeros(0, max(M, 1), dtype=torch.long, device=dev),
                torch.zeros(0, max(M, 1), P, dtype=acc, device=dev))
    index_t = device_tensor(index, dev)
    live_t = device_tensor(live, dev, torch.bool)[:, :, None]
    if guidance == "mean":
        weight = live_t.to(acc) / live_t.sum(1, keepdim=True).to(acc)
        return index_t, weight.expand(-1, -1, P).contiguous()
    w = adaptive_adjustment.weight.reshape(-1).to(acc)
    scores = features.to(acc) @ w + adaptive_adjustment.bias.to(acc)  # [T, P]
    picked = scores.index_select(0, index_t.reshape(-1)).view(*index_t.shape, P)
    weight = torch.softmax(picked.masked_fill(~live_t, float("-inf")), dim=1)
    return index_t, weight
