"""Part B, contextual semantic generation: the Adaptive Adjustment that builds the merged
contextual features I-hat which the W-stream cross-attends to."""

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
