"""Adaptive Adjustment re-weighting (paper eq. 1): merge the contextual images of a sample.

Public op::

    context_reweight(values [T,P,D], scores [T,P], cu_images [B+1],
                     mode="leave_one_out" | "shared") -> [T,P,D] | [B,P,D]

with the caller's scores ``s[t, j]`` (one per image and patch). The model passes the Adaptive
Adjustment scores ``Linear(E)`` of its images (`sam_fast.modules.guidance`) while merging their
cross-attention K/V, the values here, which are not the features the scores are computed from;
the "mean" guidance ablation (paper Table 3 row 3) passes zero scores (uniform weights).

- ``leave_one_out`` (paper): ``I-hat_i[j] = sum_{m != i} softmax_{m != i}(s[m, j]) * V_m[j]`` for
  every image i of a sample; a one-image sample has no contextual image and gets zeros.
- ``shared`` (released code): ``I-hat_b[j] = sum_m softmax_m(s[m, j]) * V_m[j]`` over all images m
  of sample b, one map per sample.

The softmax runs over the images of one sample, separately for each patch position j.
Differentiable with respect to the values and the scores. Computation is in fp32 whatever the
input dtypes; the output has the values' dtype.

Non-finite input (every backend, the reference included): a *column* (one sample, one patch
position j) whose scores hold any NaN or +-inf has no defined softmax, so every output of that
column is NaN (``+inf`` scores give NaN as ``inf - inf`` does in a softmax, and ``-inf`` scores
too, whatever ``torch.softmax`` alone would give them); so are the column's value and score
gradients. Other columns are unaffected. Kernels never index memory from a comparison with a
NaN: NaN in gives NaN out, never a crash. The column rule looks at the scores only (the model's
scores are ``Linear(E)``, non-finite wherever its features are): a non-finite value with finite
scores makes NaN the outputs whose softmax support holds it (backends may differ on the others
of its column).

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
  |V| (kernels/context_reweight.py). Its backward sums directly, O(n^2 D) arithmetic on the
  O(n D) tiles a program re-reads from L2.
- CUDA: direct sums per output, O(n^2 D) arithmetic on O(n D) bytes re-read from L1/L2 (n <= 16
  images per sample in practice, so the op stays memory-bound); its coefficients and score
  gradients are the CPU's (common header). It was validated on an H200 as it is; moving it to the
  CPU's prefix/suffix form waits for a GPU to measure it on.
"""

from __future__ import annotations

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


def _check_scores(values, scores) -> None:
    """scores: a floating-point [T, P] tensor (shapes and dtype only: safe while tracing)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"context_reweight: scores must be a [T, P] tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != tuple(values.shape[:2]):
        raise ValueError(f"context_reweight: scores must be [T, P] = {list(values.shape[:2])}, "
                         f"got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"context_reweight: scores dtype {scores.dtype} is not floating point")


def _check_values(values) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 3:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"context_reweight: values must be [T, P, D], got {shape}")


def validate_context_reweight(values, scores, cu_images, mode, offsets=None) -> None:
    """Raise ValueError (TypeError for a non-tensor) naming the offending value for any malformed
    input. `offsets` (a host copy of cu_images' values) is checked instead of reading cu_images
    from its device."""
    _check_mode(mode)
    _check_values(values)
    if not values.is_floating_point():
        raise ValueError(f"context_reweight: values dtype {values.dtype} is not floating point")
    T = values.shape[0]
    _check_scores(values, scores)
    if not isinstance(cu_images, torch.Tensor) or cu_images.dim() != 1:
        raise ValueError(f"context_reweight: cu_images must be a 1-D tensor of offsets, got {_short(cu_images)}")
    if cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images dtype {cu_images.dtype} must be int32 or int64")
    if cu_images.numel() < 2:
        raise ValueError(f"context_reweight: cu_images needs B+1 >= 2 entries, got {cu_images.numel()}")
    for name, t in (("scores", scores), ("cu_images", cu_images)):  # (before reading cu_images)
        if t.device != values.device:
            raise ValueError(f"context_reweight: {name} is on {t.device} but values are on {values.device}")
    if offsets is not None and len(offsets) != cu_images.numel():
        raise ValueError(f"context_reweight: offsets has {len(offsets)} entries but cu_images {cu_images.numel()}")
    cu = list(offsets) if offsets is not None else cu_images.tolist()
    if cu[0] != 0:
        raise ValueError(f"context_reweight: cu_images[0]={cu[0]} must be 0")
    if cu[-1] != T:
        raise ValueError(f"context_reweight: cu_images[-1]={cu[-1]} must equal T={T} (values.shape[0])")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"context_reweight: cu_images decreases at sample {b}: {cu[b]} -> {cu[b + 1]}")
        if cu[b + 1] == cu[b]:
            raise ValueError(f"context_reweight: sample {b} is empty (cu_images[{b}] == cu_images[{b + 1}] == {cu[b]})")


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"context_reweight: mode={_short(mode)} is not one of {MODES}")


def _short(x, limit: int = 80) -> str:
    """A bounded repr of a user value for an error message."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def context_reweight_ref(values, scores, cu_images, mode="leave_one_out"):
    """Plain-PyTorch reference (the specification): loops over samples, masked softmax over
    an explicit [N, N, P] logit tensor for leave_one_out. Differentiable by autograd with respect
    to the values and the scores.

    A column with a non-finite score is NaN, and so are its gradients (module docstring): NaN is
    added to all its scores, so the softmax and autograd carry it. A non-finite value spreads
    through the sums that hold it."""
    P = values.shape[1]
    acc = torch.promote_types(values.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    x = values.to(acc)
    scores = scores.to(acc)
    with torch.no_grad():
        bad = ~torch.isfinite(scores)  # [T, P]
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
    return torch.cat(outs, 0).to(values.dtype)


# -- compiled backends: torch.library ops with fake (shape) implementations and autograd ------------
#
# Each compiled backend is a pair of ops, forward and backward, with the same signature:
#   fwd(values [T,P,D], scores [T,P], cu_images [B+1], shared) -> [T|B, P, D]
#   bwd(grad_out, values, scores, cu_images, shared, values_grad)
#       -> (d values [T,P,D] (an empty [0] unless values_grad), d scores [T,P] fp32)
# "cpu"/"cuda": sam_fast::context_reweight_fwd/_bwd, defined in C++ (csrc/, Meta kernels there).
# "triton": sam_fast::context_reweight_triton_fwd/_bwd, custom ops defined below.
# Autograd is registered here for both, so torch.compile sees one opaque op per direction and
# opcheck can test schema, fake tensors and autograd. The backward is not itself differentiable.

_TRITON_MAX_D = 8192  # one program holds a [rows, next_pow2(D)] tile


def _register_autograd(fwd_name: str, bwd):
    def setup_context(ctx, inputs, output):
        values, scores, cu_images, shared = inputs
        ctx.save_for_backward(values, scores, cu_images)
        ctx.shared = shared

    def backward(ctx, grad):
        values, scores, cu_images = ctx.saved_tensors
        values_grad, scores_grad = ctx.needs_input_grad[:2]
        d_values, d_scores = bwd(grad, values, scores, cu_images, ctx.shared, values_grad)
        return (d_values if values_grad else None, d_scores.to(scores.dtype) if scores_grad else None, None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _out_rows(values, cu_images, shared):
    return cu_images.shape[0] - 1 if shared else values.shape[0]


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


def _triton_forward(values, scores, cu_images, shared):
    from sam_fast._kernels.context_reweight import context_reweight_fwd_kernel

    V = values.contiguous()
    T, P, D = V.shape
    B = cu_images.shape[0] - 1
    out = V.new_empty(B if shared else T, P, D)
    if B == 0 or P == 0 or D == 0:  # nothing to compute (and no block sizes for an empty axis)
        return out
    block_p, block_d, warps = _triton_blocks(P, D, 2 if shared else 3, interpret=interpreting())
    context_reweight_fwd_kernel[(B, cdiv(P, block_p))](
        V, scores.to(torch.float32).contiguous(), cu_images.contiguous(), out, P, D, SHARED=shared,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _triton_backward(grad_out, values, scores, cu_images, shared, values_grad):
    from sam_fast._kernels.context_reweight import context_reweight_bwd_kernel

    V = values.contiguous()
    T, P, D = V.shape
    B = cu_images.shape[0] - 1
    d_scores = V.new_zeros((T, P), dtype=torch.float32)
    if B == 0 or P == 0 or D == 0:  # no column: zero gradients (and no block sizes for an empty axis)
        return V.new_zeros(V.shape if values_grad else (0,)), d_scores
    d_values = V.new_empty(V.shape if values_grad else (0,))
    block_p, block_d, warps = _triton_blocks(P, D, 6, interpret=interpreting())
    work = V.new_empty(T, P, 2, dtype=torch.float32)
    context_reweight_bwd_kernel[(B, cdiv(P, block_p))](
        grad_out.to(V.dtype).contiguous(), V, scores.to(torch.float32).contiguous(), cu_images.contiguous(),
        work, d_values, d_scores, P, D, SHARED=shared, VALUES_GRAD=values_grad, BLOCK_P=block_p,
        BLOCK_D=block_d, num_warps=warps,
    )
    return d_values, d_scores


@torch.library.custom_op("sam_fast::context_reweight_triton_fwd", mutates_args=())
def _triton_fwd_op(values: torch.Tensor, scores: torch.Tensor, cu_images: torch.Tensor, shared: bool) -> torch.Tensor:
    return _triton_forward(values, scores, cu_images, shared)


@_triton_fwd_op.register_fake
def _(values, scores, cu_images, shared):
    return values.new_empty(_out_rows(values, cu_images, shared), values.shape[1], values.shape[2])


@torch.library.custom_op("sam_fast::context_reweight_triton_bwd", mutates_args=())
def _triton_bwd_op(grad_out: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, cu_images: torch.Tensor,
                   shared: bool, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_backward(grad_out, values, scores, cu_images, shared, values_grad)


@_triton_bwd_op.register_fake
def _(grad_out, values, scores, cu_images, shared, values_grad):
    return (values.new_empty(values.shape if values_grad else (0,)),
            values.new_empty(values.shape[:2], dtype=torch.float32))


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


def _cpp_backend(values, scores, cu_images, mode="leave_one_out"):
    return _cpp_ops()(values, scores, cu_images, mode == "shared")


def _triton_backend(values, scores, cu_images, mode="leave_one_out"):
    return _triton_fwd_op(values, scores, cu_images, mode == "shared")


# -- backend checks: None = can run these inputs, else the reason ----------------------------------

def _ext_reason():
    from sam_fast import _ext

    if _CPP_FWD is None:
        return None, f"extension not available ({_ext.info().get('error')})"
    return _ext, None


def _check_cpu(values, scores, cu_images, mode="leave_one_out"):
    _, why = _ext_reason()
    if why:
        return why
    if values.device.type != "cpu":
        return f"inputs on {values.device}, this is the CPU kernel"
    return dtype_reason(values.dtype)


def _check_cuda(values, scores, cu_images, mode="leave_one_out"):
    ext, why = _ext_reason()
    if why:
        return why
    if not ext.info().get("with_cuda"):
        return "sam_fast._C was built without CUDA (CPU torch or no CUDA toolkit at build time)"
    if values.device.type != "cuda":
        return f"inputs on {values.device}, the CUDA kernel needs CUDA tensors"
    return dtype_reason(values.dtype)


def _check_triton(values, scores, cu_images, mode="leave_one_out"):
    if not HAVE_TRITON:
        return "triton is not installed"
    why = triton_device_reason(values.device) or dtype_reason(values.dtype)
    if why:
        return why
    if values.shape[-1] > _TRITON_MAX_D:
        return f"D={values.shape[-1]} > {_TRITON_MAX_D} (one program holds a whole row)"
    return None


def _sample():
    g = torch.Generator().manual_seed(0)
    values, scores = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, generator=g)
    return (values, scores, torch.tensor([0, 2, 5], dtype=torch.int32), "leave_one_out"), {}


_dispatch = dispatcher("context_reweight")
_dispatch.sample = _sample
_dispatch.register("triton", _triton_backend, _check_triton)
_dispatch.register("cuda", _cpp_backend, _check_cuda)
_dispatch.register("cpu", _cpp_backend, _check_cpu)
_dispatch.register("reference", context_reweight_ref, always_usable)


def _check_traced(values, scores, cu_images, mode) -> None:
    """The shape-only part of `validate_context_reweight`, safe while torch.compile traces
    (offset values are data: reading them would break the graph)."""
    _check_mode(mode)
    _check_values(values)
    _check_scores(values, scores)
    if cu_images.dim() != 1 or cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images must be 1-D int32/int64, got {tuple(cu_images.shape)} {cu_images.dtype}")


def context_reweight(values, scores, cu_images, mode="leave_one_out", offsets=None):
    """Merged contextual maps I-hat of the values (see module docstring).

    Args:
        values: [T, P, D] values of a ragged batch, images sample-major (the model: the images'
            cross-attention K/V).
        scores: [T, P] score of each image and patch (the model: Adaptive Adjustment ``Linear(E)``;
            zeros for uniform weights), any floating dtype, used in fp32.
        cu_images: [B+1] int32/int64 offsets, cu_images[0] = 0, cu_images[-1] = T, increasing.
        mode: "leave_one_out" -> [T, P, D]; "shared" -> [B, P, D].
        offsets: optional host copy (list of ints) of cu_images' values. Validation then reads it
            instead of cu_images, which on a GPU saves a device-to-host copy (a sync) per call;
            the caller vouches that both hold the same values.

    Differentiable with respect to values and scores on every backend. The backend is the first
    of triton (CUDA tensors), cuda, cpu (sam_fast._C), reference that can run the inputs;
    ``SAM_FAST_BACKEND`` forces one (see `sam_fast.ops.dispatch`).

    Raises:
        ValueError: naming the offending shape, dtype, offset or device (TypeError: scores that
            are not a tensor).
    """
    if torch.compiler.is_compiling():
        _check_traced(values, scores, cu_images, mode)
    else:
        validate_context_reweight(values, scores, cu_images, mode, offsets)
    return _dispatch(values, scores, cu_images, mode)
