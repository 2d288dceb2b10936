"""Adaptive Adjustment re-weighting (paper eq. 1): merge the contextual images of a sample.

Public op::

    context_reweight(features [T,P,D], weight [D] | [1,D] | None, bias [] | [1] | None,
                     cu_images [B+1], mode="leave_one_out" | "shared",
                     *, scores=None | [T,P]) -> [T,P,D] | [B,P,D]

With scores ``s[t, j] = features[t, j] . weight + bias`` (one per image and patch), or the
caller's own ``scores`` [T, P] (then weight and bias are None and the gradient goes to the scores;
the model passes the Adaptive Adjustment scores of the images this way while merging their
cross-attention K/V, which are not the features the scores are computed from):

- ``leave_one_out`` (paper): ``I-hat_i[j] = sum_{m != i} softmax_{m != i}(s[m, j]) * E_m[j]`` for
  every image i of a sample; a one-image sample has no contextual image and gets zeros.
- ``shared`` (released code): ``I-hat_b[j] = sum_m softmax_m(s[m, j]) * E_m[j]`` over all images m
  of sample b, one map per sample.

The softmax runs over the images of one sample, separately for each patch position j.
``weight=None`` gives uniform weights (the "mean" guidance ablation, paper Table 3 row 3).
Computation is in fp32 whatever the input dtype; the output has the input dtype.

Non-finite input (every backend, the reference included): a *column* (one sample, one patch
position j) whose features, or scores, hold any NaN or +-inf has no defined softmax, so every
output of that column is NaN (``+inf`` scores give NaN as ``inf - inf`` does in a softmax, and
``-inf`` scores too, whatever ``torch.softmax`` alone would give them); so are the column's
feature gradients, and the weight and bias gradients are NaN. A score is non-finite when a
feature, the weight or the bias is, or when the dot product overflows (|s| > 3.4e38 in fp32;
the compiled CPU/CUDA kernels accumulate it in fp64, Triton and the reference in fp32, so they
can differ only for sums that overflow midway). Other columns are unaffected. Kernels never
index memory from a comparison with a NaN: NaN in gives NaN out, never a crash. With given
``scores`` the column rule looks at the scores only: a non-finite feature then makes NaN the
outputs whose softmax support holds it (backends may differ on the others of its column).

`context_reweight_ref` is the plain-PyTorch specification and the fallback; the compiled backends
(C++ CPU and CUDA kernels in ``sam_fast._C``, Triton kernels in ``sam_fast._kernels``, launched
below) register with the dispatcher and must match it (one float64 oracle in the tests). They share
the softmax over the top-2 scores (the maximum of each support is m1, or m2 for the argmax's own
leave-one-out output: no overflow, no empty denominator) and differ in how they form the n
leave-one-out sums of a column, each for a reason of its hardware:

- C++ CPU: prefix plus suffix sums, O(n D) (csrc/context_reweight_common.h, the arithmetic the
  CUDA kernels include too): a CPU thread owns a whole column and keeps the n prefix rows in cache.
- Triton: the total minus the image's own term, O(n D), with the argmax's output summed
  separately: a program holds [BLOCK_P, D] tiles in registers and cannot keep n prefix tiles; for
  i != argmax the removed weight is <= 1 <= the remaining sum, so no cancellation beyond ~eps
  |F| (kernels/context_reweight.py). Its backward sums directly, O(n^2 D) arithmetic on the
  O(n D) tiles a program re-reads from L2.
- CUDA: direct sums per output, O(n^2 D) arithmetic on O(n D) bytes re-read from L1/L2 (n <= 16
  images per sample in practice, so the op stays memory-bound); its coefficients and score
  gradients are the CPU's (common header). It was validated on an H200 as it is; moving it to the
  CPU's prefix/suffix form waits for a GPU to measure it on.
"""

from __future__ import annotations

from typing import Optional

import torch

from sam_fast.ops._common import (
    HAVE_TRITON,
    always_usable,
    cdiv,
    dtype_reason,
    interpreting,
    next_pow2,
    triton_device_reason,
)
from sam_fast.ops.dispatch import dispatcher

MODES = ("leave_one_out", "shared")


def validate_context_reweight(features, weight, bias, cu_images, mode, offsets=None, scores=None) -> None:
    """Raise ValueError naming the offending value for any malformed input. `offsets` (a host
    copy of cu_images' values) is checked instead of reading cu_images from its device."""
    if mode not in MODES:
        raise ValueError(f"context_reweight: mode={mode!r} is not one of {MODES}")
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"context_reweight: features must be [T, P, D], got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"context_reweight: features dtype {features.dtype} is not floating point")
    T, _, D = features.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"context_reweight: {name} must be a tensor or None, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"context_reweight: {name} dtype {t.dtype} is not floating point")
    if weight is not None:
        if weight.numel() != D or weight.dim() > 2 or (weight.dim() == 2 and weight.shape[0] != 1):
            raise ValueError(f"context_reweight: weight must be [D] or [1, D] with D={D}, got {tuple(weight.shape)}")
        if bias is not None and bias.numel() != 1:
            raise ValueError(f"context_reweight: bias must be [] or [1], got {tuple(bias.shape)}")
    _check_scores(features, weight, bias, scores)
    if not isinstance(cu_images, torch.Tensor) or cu_images.dim() != 1:
        raise ValueError(f"context_reweight: cu_images must be a 1-D tensor of offsets, got {cu_images!r}")
    if cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images dtype {cu_images.dtype} must be int32 or int64")
    if cu_images.numel() < 2:
        raise ValueError(f"context_reweight: cu_images needs B+1 >= 2 entries, got {cu_images.numel()}")
    if offsets is not None and len(offsets) != cu_images.numel():
        raise ValueError(f"context_reweight: offsets has {len(offsets)} entries but cu_images {cu_images.numel()}")
    cu = list(offsets) if offsets is not None else cu_images.tolist()
    if cu[0] != 0:
        raise ValueError(f"context_reweight: cu_images[0]={cu[0]} must be 0")
    if cu[-1] != T:
        raise ValueError(f"context_reweight: cu_images[-1]={cu[-1]} must equal T={T} (features.shape[0])")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"context_reweight: cu_images decreases at sample {b}: {cu[b]} -> {cu[b + 1]}")
        if cu[b + 1] == cu[b]:
            raise ValueError(f"context_reweight: sample {b} is empty (cu_images[{b}] == cu_images[{b + 1}] == {cu[b]})")
    for name, t in (("weight", weight), ("bias", bias), ("scores", scores), ("cu_images", cu_images)):
        if t is not None and t.device != features.device:
            raise ValueError(f"context_reweight: {name} is on {t.device} but features are on {features.device}")


def context_reweight_ref(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    """Plain-PyTorch reference (the specification): loops over samples, masked softmax over
    an explicit [N, N, P] logit tensor for leave_one_out. Differentiable by autograd (with
    respect to the given `scores` [T, P] too).

    A column with a non-finite feature or score is NaN, and so are its gradients (module
    docstring): NaN is added to all its scores, so the softmax and autograd carry it. With given
    scores only the scores decide; a non-finite feature spreads through the sums."""
    T, P, D = features.shape
    acc = torch.promote_types(features.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    x = features.to(acc)
    given = scores is not None
    if given:
        scores = scores.to(acc)
    elif weight is None:
        scores = x.new_zeros(T, P)
    else:
        scores = x @ weight.reshape(D).to(acc)
        if bias is not None:
            scores = scores + bias.reshape(()).to(acc)
    with torch.no_grad():
        bad = ~torch.isfinite(scores)  # [T, P]
        if not given:
            bad |= ~torch.isfinite(x).all(-1)
    cu = cu_images.tolist()
    outs = []
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        s, e = scores[lo:hi], x[lo:hi]  # [N, P], [N, P, D]
        n = hi - lo
        poison = torch.where(bad[lo:hi].any(0), float("nan"), 0.0).to(acc)  # [P]: NaN or 0 per column
        s = s + poison
        if mode == "shared":
            a = torch.softmax(s, dim=0)  # over the images of the sample, per patch
            outs.append(torch.einsum("mp,mpd->pd", a, e).unsqueeze(0))
        elif n == 1:
            # no contextual image: zeros, NaN for a non-finite column; stays in the graph
            outs.append(e * poison[:, None] + s.unsqueeze(-1) * poison[:, None])
        else:
            self_mask = torch.eye(n, dtype=torch.bool, device=x.device)[:, :, None]  # [i, m, 1]
            logits = s.unsqueeze(0).expand(n, n, P).masked_fill(self_mask, float("-inf"))
            a = torch.softmax(logits, dim=1)  # [i, m, P]: image i's weights over m != i
            outs.append(torch.einsum("imp,mpd->ipd", a, e))
    return torch.cat(outs, 0).to(features.dtype)


# -- compiled backends: torch.library ops with fake (shape) implementations and autograd ------------
#
# Each compiled backend is a pair of ops, forward and backward, with the same signature:
#   fwd(features [T,P,D], weight [D], bias [], cu_images [B+1], shared, scores [T,P] | None) -> [T|B, P, D]
#   bwd(grad_out, features, weight, bias, cu_images, shared, features_grad, scores)
#       -> (d features [T,P,D] (an empty [0] unless features_grad), d weight [D] fp32, d bias [] fp32,
#           d scores [T,P] fp32 when scores were given, else an empty [0])
# Given scores replace features . weight + bias (weight and bias are zeros then).
# "cpu"/"cuda": sam_fast::context_reweight_fwd/_bwd, defined in C++ (csrc/, Meta kernels there).
# "triton": sam_fast::context_reweight_triton_fwd/_bwd, custom ops defined below.
# Autograd is registered here for both, so torch.compile sees one opaque op per direction and
# opcheck can test schema, fake tensors and autograd. The backward is not itself differentiable.

_TRITON_MAX_D = 8192  # one program holds a [rows, next_pow2(D)] tile


def _register_autograd(fwd_name: str, bwd):
    def setup_context(ctx, inputs, output):
        features, weight, bias, cu_images, shared, scores = inputs
        ctx.save_for_backward(features, weight, bias, cu_images, scores)
        ctx.shared = shared

    def backward(ctx, grad):
        features, weight, bias, cu_images, scores = ctx.saved_tensors
        features_grad = ctx.needs_input_grad[0]
        d_features, d_weight, d_bias, d_scores = bwd(grad, features, weight, bias, cu_images, ctx.shared,
                                                     features_grad, scores)
        return (
            d_features if features_grad else None,
            d_weight.to(weight.dtype),
            d_bias.to(bias.dtype).reshape(bias.shape),
            None,
            None,
            None if scores is None else d_scores.to(scores.dtype),
        )

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _out_rows(features, cu_images, shared):
    return cu_images.shape[0] - 1 if shared else features.shape[0]


def _triton_blocks(P, D, tiles, interpret: bool):
    """(BLOCK_P, BLOCK_D, num_warps). On a GPU a program holds `tiles` fp32 [BLOCK_P, BLOCK_D]
    tiles in registers; under the CPU interpreter (`interpret`) every program costs milliseconds,
    so one program takes all patches of a sample."""
    block_d = next_pow2(D)
    if interpret:
        return next_pow2(P), block_d, 4
    budget = max(1, 8192 // (tiles * block_d))  # patches whose `tiles` fp32 rows fit 8192 elements
    block_p = min(next_pow2(P), 1 << (budget.bit_length() - 1))  # tl.arange needs a power of 2
    return block_p, block_d, 8 if block_d >= 1024 else 4


def _triton_forward(features, weight, bias, cu_images, shared, given=None):
    from sam_fast._kernels.context_reweight import context_reweight_fwd_kernel

    F = features.contiguous()
    T, P, D = F.shape
    B = cu_images.shape[0] - 1
    out = F.new_empty(B if shared else T, P, D)
    if B == 0 or P == 0 or D == 0:  # nothing to compute (and no block sizes for an empty axis)
        return out
    scores = F.new_empty(T, P, dtype=torch.float32)
    block_p, block_d, warps = _triton_blocks(P, D, 2 if shared else 3, interpret=interpreting())
    context_reweight_fwd_kernel[(B, cdiv(P, block_p))](
        F, weight.contiguous(), bias.reshape(1).contiguous(), _given(given, scores), cu_images.contiguous(),
        scores, out, P, D, SHARED=shared, GIVEN=given is not None, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=warps,
    )
    return out


def _given(given, like):
    """The given scores as a contiguous fp32 [T, P] tensor, or `like` (a stand-in pointer the
    kernel never reads) when there are none."""
    return like if given is None else given.to(torch.float32).contiguous()


def _triton_backward(grad_out, features, weight, bias, cu_images, shared, features_grad, given=None):
    from sam_fast._kernels.context_reweight import context_reweight_bwd_kernel, context_reweight_reduce_kernel

    F = features.contiguous()
    T, P, D = F.shape
    B = cu_images.shape[0] - 1
    G = grad_out.to(F.dtype).contiguous()
    d_scores = F.new_zeros((T, P) if given is not None else (0,), dtype=torch.float32)
    if B == 0 or P == 0 or D == 0:  # no column: zero gradients (and no block sizes for an empty axis)
        return (F.new_zeros(F.shape if features_grad else (0,)), F.new_zeros(D, dtype=torch.float32),
                F.new_zeros((), dtype=torch.float32), d_scores)
    d_features = F.new_empty(F.shape if features_grad else (0,))
    block_p, block_d, warps = _triton_blocks(P, D, 6, interpret=interpreting())
    grid = (B, cdiv(P, block_p))
    # d(weight), d(bias) partial sums per program (a never-written stand-in for given scores)
    partial = F.new_zeros(1 if given is not None else grid[0] * grid[1], D + 1, dtype=torch.float32)
    scores = F.new_empty(T, P, dtype=torch.float32)
    work = F.new_empty(T, P, 2, dtype=torch.float32)
    context_reweight_bwd_kernel[grid](
        G, F, weight.contiguous(), bias.reshape(1).contiguous(), _given(given, scores), cu_images.contiguous(),
        scores, work, d_features, partial, d_scores, P, D, SHARED=shared, FEATURES_GRAD=features_grad,
        GIVEN=given is not None, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps,
    )
    if given is not None:  # their gradient is d_scores; weight and bias were zeros
        return d_features, F.new_zeros(D, dtype=torch.float32), F.new_zeros((), dtype=torch.float32), d_scores
    reduced = F.new_empty(D + 1, dtype=torch.float32)
    block = min(1024, next_pow2(D + 1))
    context_reweight_reduce_kernel[(cdiv(D + 1, block),)](
        partial, reduced, partial.shape[0], D + 1, BLOCK=block)
    return d_features, reduced[:D].clone(), reduced[D].clone(), d_scores


@torch.library.custom_op("sam_fast::context_reweight_triton_fwd", mutates_args=())
def _triton_fwd_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   cu_images: torch.Tensor, shared: bool, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _triton_forward(features, weight, bias, cu_images, shared, scores)


@_triton_fwd_op.register_fake
def _(features, weight, bias, cu_images, shared, scores=None):
    return features.new_empty(_out_rows(features, cu_images, shared), features.shape[1], features.shape[2])


@torch.library.custom_op("sam_fast::context_reweight_triton_bwd", mutates_args=())
def _triton_bwd_op(grad_out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   cu_images: torch.Tensor, shared: bool, features_grad: bool,
                   scores: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(grad_out, features, weight, bias, cu_images, shared, features_grad, scores)


@_triton_bwd_op.register_fake
def _(grad_out, features, weight, bias, cu_images, shared, features_grad, scores=None):
    d_features = features.new_empty(features.shape if features_grad else (0,))
    T, P, D = features.shape
    return (d_features, features.new_empty(D, dtype=torch.float32), features.new_empty((), dtype=torch.float32),
            features.new_empty((T, P) if scores is not None else (0,), dtype=torch.float32))


_register_autograd("sam_fast::context_reweight_triton_fwd", _triton_bwd_op)

def _load_cpp_ops():
    """Load sam_fast._C (never raises) and give its ops autograd. Done at import, not on first
    use: torch.compile must not trace file reads or registrations."""
    from sam_fast import _ext

    if _ext.load() is None:
        return None
    _register_autograd("sam_fast::context_reweight_fwd", torch.ops.sam_fast.context_reweight_bwd)
    return torch.ops.sam_fast.context_reweight_fwd


_CPP_FWD = _load_cpp_ops()


def _cpp_ops():
    """torch.ops.sam_fast.context_reweight_fwd (with autograd), or None without the extension."""
    return _CPP_FWD


def _op_args(features, weight, bias):
    """(weight [D], bias []) for the compiled ops; weight=None (uniform weights, or given scores)
    -> zeros."""
    D = features.shape[-1]
    if weight is None:
        return features.new_zeros(D, dtype=torch.float32), features.new_zeros((), dtype=torch.float32)
    w = weight.reshape(D)
    b = bias.reshape(()) if bias is not None else weight.new_zeros(())
    return w, b


def _cpp_backend(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    w, b = _op_args(features, weight, bias)
    return _cpp_ops()(features, w, b, cu_images, mode == "shared", scores)


def _triton_backend(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    w, b = _op_args(features, weight, bias)
    return _triton_fwd_op(features, w, b, cu_images, mode == "shared", scores)


# -- backend checks: None = can run these inputs, else the reason ----------------------------------

def _ext_reason():
    from sam_fast import _ext

    if _CPP_FWD is None:
        return None, f"extension not available ({_ext.info().get('error')})"
    return _ext, None


def _check_cpu(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    _, why = _ext_reason()
    if why:
        return why
    if features.device.type != "cpu":
        return f"inputs on {features.device}, this is the CPU kernel"
    return dtype_reason(features.dtype)


def _check_cuda(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    ext, why = _ext_reason()
    if why:
        return why
    if not ext.info().get("with_cuda"):
        return "sam_fast._C was built without CUDA (CPU torch or no CUDA toolkit at build time)"
    if features.device.type != "cuda":
        return f"inputs on {features.device}, the CUDA kernel needs CUDA tensors"
    return dtype_reason(features.dtype)


def _check_triton(features, weight, bias, cu_images, mode="leave_one_out", scores=None):
    if not HAVE_TRITON:
        return "triton is not installed"
    why = triton_device_reason(features.device) or dtype_reason(features.dtype)
    if why:
        return why
    if features.shape[-1] > _TRITON_MAX_D:
        return f"D={features.shape[-1]} > {_TRITON_MAX_D} (one program holds a whole row)"
    return None


def _sample():
    f = torch.randn(5, 3, 8)
    return (f, torch.randn(8), torch.zeros(()), torch.tensor([0, 2, 5], dtype=torch.int32), "leave_one_out"), {}


_dispatch = dispatcher("context_reweight")
_dispatch.sample = _sample
_dispatch.register("triton", _triton_backend, _check_triton)
_dispatch.register("cuda", _cpp_backend, _check_cuda)
_dispatch.register("cpu", _cpp_backend, _check_cpu)
_dispatch.register("reference", context_reweight_ref, always_usable)


def _check_traced(features, weight, bias, cu_images, mode, scores=None) -> None:
    """The shape-only part of `validate_context_reweight`, safe while torch.compile traces
    (offset values are data: reading them would break the graph)."""
    if mode not in MODES:
        raise ValueError(f"context_reweight: mode={mode!r} is not one of {MODES}")
    if features.dim() != 3:
        raise ValueError(f"context_reweight: features must be [T, P, D], got {tuple(features.shape)}")
    if weight is not None and weight.numel() != features.shape[-1]:
        raise ValueError(f"context_reweight: weight must be [D] or [1, D] with D={features.shape[-1]}, got {tuple(weight.shape)}")
    if cu_images.dim() != 1 or cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images must be 1-D int32/int64, got {tuple(cu_images.shape)} {cu_images.dtype}")
    _check_scores(features, weight, bias, scores)


def _check_scores(features, weight, bias, scores) -> None:
    """Given scores: [T, P] floating point, and then no weight or bias (shapes only)."""
    if scores is None:
        return
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"context_reweight: scores must be a tensor or None, got {type(scores).__name__}")
    if weight is not None or bias is not None:
        raise ValueError("context_reweight: pass either scores or weight/bias, not both")
    if tuple(scores.shape) != tuple(features.shape[:2]):
        raise ValueError(f"context_reweight: scores must be [T, P] = {list(features.shape[:2])}, "
                         f"got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"context_reweight: scores dtype {scores.dtype} is not floating point")


def context_reweight(features, weight, bias, cu_images, mode="leave_one_out", offsets=None, *, scores=None):
    """Merged contextual feature maps I-hat (see module docstring).

    Args:
        features: [T, P, D] image features E of a ragged batch, images sample-major.
        weight: [D] or [1, D] Adaptive Adjustment Linear weight, or None for uniform weights.
        bias: [] or [1] (ignored mathematically by the softmax, kept for exact gradients) or None.
        cu_images: [B+1] int32/int64 offsets, cu_images[0] = 0, cu_images[-1] = T, increasing.
        mode: "leave_one_out" -> [T, P, D]; "shared" -> [B, P, D].
        offsets: optional host copy (list of ints) of cu_images' values. Validation then reads it
            instead of cu_images, which on a GPU saves a device-to-host copy (a sync) per call;
            the caller vouches that both hold the same values.
        scores: optional [T, P] scores used instead of ``features . weight + bias`` (weight and
            bias must then be None); computed in fp32 whatever their dtype.

    Differentiable with respect to features, weight and bias (or scores) on every backend. The backend is
    the first of triton (CUDA tensors), cuda, cpu (sam_fast._C), reference that can run the
    inputs; ``SAM_FAST_BACKEND`` forces one (see `sam_fast.ops.dispatch`).

    Raises:
        ValueError: naming the offending shape, dtype, offset or device.
    """
    if torch.compiler.is_compiling():
        _check_traced(features, weight, bias, cu_images, mode, scores)
    else:
        validate_context_reweight(features, weight, bias, cu_images, mode, offsets, scores)
    if scores is None:  # (backends registered with the five-argument form keep working)
        return _dispatch(features, weight, bias, cu_images, mode)
    return _dispatch(features, weight, bias, cu_images, mode, scores=scores)
