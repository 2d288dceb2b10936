"""Adaptive Adjustment re-weighting (paper eq. 1, SPEC §1): merge the contextual images of a sample.

Public op::

    context_reweight(features [T,P,D], weight [D] | [1,D] | None, bias [] | [1] | None,
                     cu_images [B+1], mode="leave_one_out" | "shared") -> [T,P,D] | [B,P,D]

With scores ``s[t, j] = features[t, j] . weight + bias`` (one per image and patch):

- ``leave_one_out`` (paper): ``I-hat_i[j] = sum_{m != i} softmax_{m != i}(s[m, j]) * E_m[j]`` for
  every image i of a sample; a one-image sample has no contextual image and gets zeros.
- ``shared`` (released code): ``I-hat_b[j] = sum_m softmax_m(s[m, j]) * E_m[j]`` over all images m
  of sample b, one map per sample.

The softmax runs over the images of one sample, separately for each patch position j.
``weight=None`` gives uniform weights (the "mean" guidance ablation, paper Table 3 row 3).
Computation is in fp32 whatever the input dtype; the output has the input dtype.

`context_reweight_ref` is the plain-PyTorch specification and the fallback; compiled backends
(`sam_fast._C`, later Triton/CUDA) register with the dispatcher and must match it.
"""

from __future__ import annotations

import torch

from sam_fast.ops.dispatch import dispatcher

MODES = ("leave_one_out", "shared")


def validate_context_reweight(features, weight, bias, cu_images, mode) -> None:
    """Raise ValueError naming the offending value for any malformed input."""
    if mode not in MODES:
        raise ValueError(f"context_reweight: mode={mode!r} is not one of {MODES}")
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"context_reweight: features must be [T, P, D], got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"context_reweight: features dtype {features.dtype} is not floating point")
    T, _, D = features.shape
    if weight is not None:
        if weight.numel() != D or weight.dim() > 2 or (weight.dim() == 2 and weight.shape[0] != 1):
            raise ValueError(f"context_reweight: weight must be [D] or [1, D] with D={D}, got {tuple(weight.shape)}")
        if bias is not None and bias.numel() != 1:
            raise ValueError(f"context_reweight: bias must be [] or [1], got {tuple(bias.shape)}")
    if not isinstance(cu_images, torch.Tensor) or cu_images.dim() != 1:
        raise ValueError(f"context_reweight: cu_images must be a 1-D tensor of offsets, got {cu_images!r}")
    if cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images dtype {cu_images.dtype} must be int32 or int64")
    if cu_images.numel() < 2:
        raise ValueError(f"context_reweight: cu_images needs B+1 >= 2 entries, got {cu_images.numel()}")
    cu = cu_images.tolist()
    if cu[0] != 0:
        raise ValueError(f"context_reweight: cu_images[0]={cu[0]} must be 0")
    if cu[-1] != T:
        raise ValueError(f"context_reweight: cu_images[-1]={cu[-1]} must equal T={T} (features.shape[0])")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"context_reweight: cu_images decreases at sample {b}: {cu[b]} -> {cu[b + 1]}")
        if cu[b + 1] == cu[b]:
            raise ValueError(f"context_reweight: sample {b} is empty (cu_images[{b}] == cu_images[{b + 1}] == {cu[b]})")
    for name, t in (("weight", weight), ("bias", bias), ("cu_images", cu_images)):
        if t is not None and t.device != features.device:
            raise ValueError(f"context_reweight: {name} is on {t.device} but features are on {features.device}")


def context_reweight_ref(features, weight, bias, cu_images, mode="leave_one_out"):
    """Plain-PyTorch reference (the specification): loops over samples, masked softmax over
    an explicit [N, N, P] logit tensor for leave_one_out. Differentiable by autograd."""
    T, P, D = features.shape
    acc = torch.promote_types(features.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    x = features.to(acc)
    if weight is None:
        scores = x.new_zeros(T, P)
    else:
        scores = x @ weight.reshape(D).to(acc)
        if bias is not None:
            scores = scores + bias.reshape(()).to(acc)
    cu = cu_images.tolist()
    outs = []
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        s, e = scores[lo:hi], x[lo:hi]  # [N, P], [N, P, D]
        n = hi - lo
        if mode == "shared":
            a = torch.softmax(s, dim=0)  # over the images of the sample, per patch
            outs.append(torch.einsum("mp,mpd->pd", a, e).unsqueeze(0))
        elif n == 1:
            outs.append(e * 0)  # no contextual image; stays in the graph (zero gradient)
        else:
            self_mask = torch.eye(n, dtype=torch.bool, device=x.device)[:, :, None]  # [i, m, 1]
            logits = s.unsqueeze(0).expand(n, n, P).masked_fill(self_mask, float("-inf"))
            a = torch.softmax(logits, dim=1)  # [i, m, P]: image i's weights over m != i
            outs.append(torch.einsum("imp,mpd->ipd", a, e))
    return torch.cat(outs, 0).to(features.dtype)


# -- backends -------------------------------------------------------------------------------

def _check_reference(*args, **kwargs):
    return None


def _needs_grad(features, weight, bias):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, weight, bias))


def _check_cpu_ext(features, weight, bias, cu_images, mode="leave_one_out"):
    try:
        from sam_fast import _ext
    except ImportError as exc:
        return f"extension loader missing ({exc})"
    if _ext.load() is None:
        return f"extension not available ({_ext.info().get('error')})"
    if features.device.type != "cpu":
        return f"inputs on {features.device}, the compiled kernel here is the CPU one"
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {features.dtype} not supported (float32, float16, bfloat16)"
    if _needs_grad(features, weight, bias):
        return "inputs require grad and the compiled kernel is forward-only (the reference runs autograd)"
    return None


def _cpu_ext(features, weight, bias, cu_images, mode="leave_one_out"):
    D = features.shape[-1]
    if weight is None:  # uniform weights == zero scores
        weight = features.new_zeros(D)
        bias = None
    w = weight.reshape(D).to(features.dtype)
    b = (bias.reshape(()) if bias is not None else features.new_zeros(())).to(features.dtype)
    return torch.ops.sam_fast.context_reweight_fwd(
        features.contiguous(), w.contiguous(), b, cu_images, mode == "shared"
    )


def _sample():
    f = torch.randn(5, 3, 8)
    return (f, torch.randn(8), torch.zeros(()), torch.tensor([0, 2, 5], dtype=torch.int32), "leave_one_out"), {}


_dispatch = dispatcher("context_reweight")
_dispatch.sample = _sample
_dispatch.register("cpu", _cpu_ext, _check_cpu_ext)
_dispatch.register("reference", context_reweight_ref, _check_reference)


def context_reweight(features, weight, bias, cu_images, mode="leave_one_out"):
    """Merged contextual feature maps I-hat (see module docstring).

    Args:
        features: [T, P, D] image features E of a ragged batch, images sample-major.
        weight: [D] or [1, D] Adaptive Adjustment Linear weight, or None for uniform weights.
        bias: [] or [1] (ignored mathematically by the softmax, kept for exact gradients) or None.
        cu_images: [B+1] int32/int64 offsets, cu_images[0] = 0, cu_images[-1] = T, increasing.
        mode: "leave_one_out" -> [T, P, D]; "shared" -> [B, P, D].

    Raises:
        ValueError: naming the offending shape, dtype, offset or device.
    """
    validate_context_reweight(features, weight, bias, cu_images, mode)
    return _dispatch(features, weight, bias, cu_images, mode)
