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
- Triton: a tiny kernel turns the scores into per-(image, patch) coefficients (top-2, e^(s - m1),
  1/Z_i, the argmax's own weights); the main kernels tile (sample, patch) x a block of channels,
  hold the sample's image tiles in registers and form every output as the total minus the
  image's own term, O(n D) with one read and one write of the values; for i != argmax the
  removed weight is <= 1 <= the remaining sum, so no cancellation beyond ~eps |V|. The backward
  (value gradients and per-channel-block partial dot products) uses the same tiling, and a small
  kernel sums the partials in a fixed order into the score gradients (sam_fast/_kernels/context_reweight.py).
- CUDA: the Triton design in CUDA (csrc/context_reweight_cuda.cu): a coefficient kernel, then a
  block per (sample, patch) x channel block holding the sample's image chunk in registers, partial
  score-gradient sums reduced across the block (shuffles, one shared-memory step between two
  barriers) and summed over the channel blocks in a fixed order; the score gradients use the
  common header's leave-one-out formula with prefix + suffix sums. It compiles for sm_80 and
  sm_90 (tests/test_extension.py) but has not yet run on a GPU (the previous kernels were
  validated on an H200).
"""

from __future__ import annotations

import torch

from sam_fast.ops._common import (
    always_usable,
    cdiv,
    dtype_reason,
    interpreting,
    next_pow2,
    triton_device_reason,
    triton_import_error,
)
from sam_fast.config import CONTEXT_MODES
from sam_fast.ops.dispatch import dispatcher

MODES = CONTEXT_MODES  # (the model's context modes are the op's)


def validate_context_reweight(values, scores, cu_images, mode, offsets=None, *, traced=False) -> None:
    """Raise ValueError (TypeError for non-tensor scores) naming the offending value for any
    malformed input: the one validator of the op. `offsets` (a host copy of cu_images' values) is
    checked instead of reading cu_images from its device; ``traced=True`` (under torch.compile)
    checks shapes, dtypes and devices only, since reading offset values would break the graph."""
    if mode not in MODES:
        raise ValueError(f"context_reweight: mode={_short(mode)} is not one of {MODES}")
    if not isinstance(values, torch.Tensor) or values.dim() != 3:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"context_reweight: values must be [T, P, D], got {shape}")
    if not values.is_floating_point():
        raise ValueError(f"context_reweight: values dtype {values.dtype} is not floating point")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"context_reweight: scores must be a [T, P] tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != tuple(values.shape[:2]):
        raise ValueError(f"context_reweight: scores must be [T, P] = {list(values.shape[:2])}, "
                         f"got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"context_reweight: scores dtype {scores.dtype} is not floating point")
    if not isinstance(cu_images, torch.Tensor) or cu_images.dim() != 1:
        raise ValueError(f"context_reweight: cu_images must be a 1-D tensor of offsets, got {_short(cu_images)}")
    if cu_images.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_reweight: cu_images dtype {cu_images.dtype} must be int32 or int64")
    if cu_images.numel() < 2:
        raise ValueError(f"context_reweight: cu_images needs B+1 >= 2 entries, got {cu_images.numel()}")
    for name, t in (("scores", scores), ("cu_images", cu_images)):  # (before reading cu_images)
        if t.device != values.device:
            raise ValueError(f"context_reweight: {name} is on {t.device} but values are on {values.device}")
    if not traced:
        _check_offsets(list(offsets) if offsets is not None else cu_images.tolist(), cu_images, values.shape[0])


def _check_offsets(cu: list[int], cu_images, T: int) -> None:
    """The values of the offsets `cu` (cu_images' host copy): 0 first, T last, every sample non-empty."""
    if len(cu) != cu_images.numel():
        raise ValueError(f"context_reweight: offsets has {len(cu)} entries but cu_images {cu_images.numel()}")
    if cu[0] != 0:
        raise ValueError(f"context_reweight: cu_images[0]={cu[0]} must be 0")
    if cu[-1] != T:
        raise ValueError(f"context_reweight: cu_images[-1]={cu[-1]} must equal T={T} (values.shape[0])")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"context_reweight: cu_images decreases at sample {b}: {cu[b]} -> {cu[b + 1]}")
        if cu[b + 1] == cu[b]:
            raise ValueError(f"context_reweight: sample {b} is empty (cu_images[{b}] == cu_images[{b + 1}] == {cu[b]})")


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


def _channel_block(D: int, cap: int) -> int:
    """The largest power of two <= `cap` whose blocks cover D with at most 1/8 of idle lanes
    (1408 -> 512, 9216 -> 1024 at cap 1024; padding 1408 to 2048 idled 31% of the lanes); one
    block of next_pow2(D) when D fits in `cap`."""
    if D <= cap:
        return next_pow2(D)
    block = cap
    while block > 16 and cdiv(D, block) * block - D > D // 8:
        block //= 2
    return block


def _triton_blocks(T: int, B: int, D: int, backward: bool, interpret: bool):
    """(NB, BLOCK_D, num_warps): images per register chunk, channels per program, warps.

    NB: the next power of two >= the mean sample size (2..16), so a sample of the usual size is
    loaded once; a bigger one takes more chunks (read again from L2). On a GPU a program holds
    about 4096 (forward) or 2048 (backward: values and gradient tiles) fp32 elements in NB x
    BLOCK_D tiles. Under the CPU interpreter (`interpret`) a row takes up to 4 or 5 blocks (16
    wide for small D), so the tests cover several blocks per row and a ragged edge without paying
    milliseconds for each of hundreds of programs."""
    nb = min(16, max(2, next_pow2(cdiv(T, max(B, 1)))))
    if interpret:
        return nb, min(next_pow2(D), max(16, next_pow2(D) // 4)), 4
    cap = min(1024 if not backward else 512, max(64, (2048 if backward else 4096) // nb))
    block_d = _channel_block(D, cap)
    return nb, block_d, 8 if nb * block_d >= 4096 else 4


def _dscore_block_p(nb: int, interpret: bool) -> int:
    """Patch lanes per program of the score-gradient kernel, which holds [NB, NB, BLOCK_P] tiles."""
    return 16 if interpret else max(16, min(128, 4096 // (nb * nb)))


def _triton_coefficients(scores, cu, B, P, shared):
    """(COEF [T, P, 4] fp32, IDX [B, P, 2] int32) of `context_reweight_coef_kernel`."""
    from sam_fast._kernels.context_reweight import context_reweight_coef_kernel

    coef = scores.new_empty(scores.shape[0], P, 4, dtype=torch.float32)
    idx = scores.new_empty(B, P, 2, dtype=torch.int32)
    block_p = min(128, next_pow2(P))
    context_reweight_coef_kernel[(B, cdiv(P, block_p))](
        scores.to(torch.float32).contiguous(), cu, coef, idx, P, SHARED=shared, BLOCK_P=block_p, num_warps=4)
    return coef, idx


@torch.library.custom_op("sam_fast::context_reweight_triton_fwd", mutates_args=())
def _triton_fwd_op(values: torch.Tensor, scores: torch.Tensor, cu_images: torch.Tensor, shared: bool) -> torch.Tensor:
    from sam_fast._kernels.context_reweight import context_reweight_fwd_kernel

    V = values.contiguous()
    T, P, D = V.shape
    B = cu_images.shape[0] - 1
    out = V.new_empty(B if shared else T, P, D)
    if B == 0 or P == 0 or D == 0:  # nothing to compute (and no block sizes for an empty axis)
        return out
    cu = cu_images.contiguous()
    coef, idx = _triton_coefficients(scores, cu, B, P, shared)
    nb, block_d, warps = _triton_blocks(T, B, D, False, interpret=interpreting())
    context_reweight_fwd_kernel[(B * P, cdiv(D, block_d))](
        V, coef, idx, cu, out, P, D, SHARED=shared, NB=nb, BLOCK_D=block_d, num_warps=warps)
    return out


@torch.library.custom_op("sam_fast::context_reweight_triton_bwd", mutates_args=())
def _triton_bwd_op(grad_out: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, cu_images: torch.Tensor,
                   shared: bool, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sam_fast._kernels.context_reweight import context_reweight_bwd_kernel, context_reweight_dscore_kernel

    V = values.contiguous()
    T, P, D = V.shape
    B = cu_images.shape[0] - 1
    d_scores = V.new_zeros((T, P), dtype=torch.float32)
    if B == 0 or P == 0 or D == 0:  # no column: zero gradients (and no block sizes for an empty axis)
        return V.new_zeros(V.shape if values_grad else (0,)), d_scores
    cu = cu_images.contiguous()
    coef, idx = _triton_coefficients(scores, cu, B, P, shared)
    interpret = interpreting()
    nb, block_d, warps = _triton_blocks(T, B, D, True, interpret=interpret)
    ncb = cdiv(D, block_d)
    d_values = V.new_empty(V.shape if values_grad else (0,))
    part = V.new_empty(ncb, T, P, 4, dtype=torch.float32)  # every slot read is written
    context_reweight_bwd_kernel[(B * P, ncb)](
        grad_out.to(V.dtype).contiguous(), V, coef, idx, cu, d_values, part, P, D, T * P * 4,
        SHARED=shared, VALUES_GRAD=values_grad, NB=nb, BLOCK_D=block_d, num_warps=warps)
    block_p = _dscore_block_p(nb, interpret=interpret)
    context_reweight_dscore_kernel[(B, cdiv(P, block_p))](
        coef, cu, part, d_scores, P, ncb, T * P * 4, SHARED=shared, NB=nb, BLOCK_P=block_p, num_warps=4)
    return d_values, d_scores


@_triton_fwd_op.register_fake
def _(values, scores, cu_images, shared):
    return values.new_empty(_out_rows(values, cu_images, shared), values.shape[1], values.shape[2])


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
    return triton_device_reason(values.device) or triton_import_error() or dtype_reason(values.dtype)


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
    validate_context_reweight(values, scores, cu_images, mode, offsets, traced=torch.compiler.is_compiling())
    return _dispatch(values, scores, cu_images, mode)
