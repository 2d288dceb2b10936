"""Part B, contextual semantic generation: the Adaptive Adjustment that builds the merged
contextual features I-hat which the W-stream cross-attends to (`merged_context_maps`), or directly
the cross-attention K/V of I-hat (`merged_context_kv`, what the model uses)."""

from __future__ import annotations

import torch
from torch import nn

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
) -> torch.Tensor:
    """The cross-attention K/V of I-hat from the K/V of the images: [T, P, C+1] (leave_one_out)
    or [B, P, C+1] (shared), merged K/V in ``[..., :C]``.

    `kv_scratch` [T, P, C+1] holds the K/V of the features E [T, P, D] in ``[..., :C]`` and one
    scratch column (``project_cross_kv(..., scratch=True)``), which this function overwrites with
    the Adaptive Adjustment scores ``s = Linear(E)``.

    Exact, not an approximation: K/V are affine in E (``K = E W_k^T + b_k``) and the weights
    ``alpha_{m,j}`` of a merged map sum to 1 over m, so ``sum_m alpha_{m,j} K_m[j] =
    (sum_m alpha_{m,j} E_m[j]) W_k^T + b_k``, the K of I-hat. (A one-image leave_one_out sample
    has no weights and a zero map; it gets no W-stream row, so that row is unused.)

    Why the K/V and not the 1408-wide features: merging the features and then projecting I-hat
    costs one more ``[P, D] x [D, n_cross*2*H]`` GEMM per merged map (the K/V projections are 36 %
    of a Q-former pass, SPEC §6); merging the K/V is a memory-bound weighted sum over a 6.5x wider
    row. Measured on the dev CPU (``bench_merge_kv_vs_features`` in
    `bench/models/bench_encode_images.py`, B=2, N=4): see the numbers recorded there.

    `context_reweight` computes its scores from its own input, so the scores ride in the scratch
    column and a one-hot weight picks them (``s * 1 + 0 * K = s`` exactly); the gradient reaches
    s, hence the Adaptive Adjustment Linear.
    """
    C = kv_scratch.shape[-1] - 1
    if guidance == "mean":
        return context_reweight(kv_scratch, None, None, cu_images, context_mode)
    if guidance != "adaptive":
        raise ValueError(f"merged_context_kv: guidance={guidance!r} has no merged maps")
    acc = torch.promote_types(features.dtype, torch.float32)
    # The weight is copied into fresh (allocator-aligned) memory: a memory-mapped checkpoint can
    # leave it misaligned, and the vectorised product then rounds differently (bitwise-equal
    # outputs for equal weights are tested).
    w = adaptive_adjustment.weight.reshape(-1).to(acc).clone()
    scores = (features.to(acc) @ w + adaptive_adjustment.bias.to(acc)).unsqueeze(-1)
    kv_scratch[..., C:] = scores.to(kv_scratch.dtype)
    pick = torch.zeros(C + 1, dtype=kv_scratch.dtype, device=kv_scratch.device)
    pick[C] = 1.0
    return context_reweight(kv_scratch, pick, None, cu_images, context_mode)
