"""Language-model loss without full logits: the lm_head matmul fused with the cross-entropy.

Public op::

    linear_cross_entropy(hidden [M, H], weight [V, H], targets [M], bias [V] | None,
                         reduction="mean" | "sum", chunk_size=None, ignore_index=-100) -> loss []

equals ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=...)``, which is
what a Hugging Face causal LM computes (logits in the model's dtype from its ``lm_head``, upcast to
fp32 for the loss), without ever holding the ``[M, V]`` logits:

- Rows whose target is ``ignore_index`` contribute nothing, so they are dropped *before* the
  matmul (no logits are computed for visual or instruction positions handed in with target -100);
  their hidden-state gradient is zero. Finding (and checking) them reads the targets' counts
  and positions on the host (a device sync), unless the caller has kept only supervised rows
  (``checked_targets=True``: their range is then asserted on the device).
- The remaining rows are processed ``chunk_size`` at a time: the chunk's logits (model dtype),
  their log-softmax in fp32 (one fused pass), the loss ``-logp[target]``, and in the same pass
  the gradient w.r.t. the chunk's logits, ``softmax - onehot`` (the exp of the log-softmax, in
  place), turned into the chunk's hidden-state gradient ``g @ weight`` right away. Backward only
  multiplies the stored ``[rows, H]`` gradient by ``grad_output`` (divided by the number of
  targets for ``"mean"``). Peak extra memory is about two chunks of logits at once (the
  model-dtype logits while their fp32 log-softmax is written), ``chunk_size x V x (4 + 4)``
  bytes in fp32, ``x (2 + 4)`` in bf16/fp16; by default one fp32 chunk is about 64 MiB.
- The weight (and bias) gradient is accumulated (fp32) only when the weight (bias) requires
  grad; a frozen ``lm_head``, as in SAM, costs nothing extra.

Numerics follow the reference: the matmul runs in the input dtype (fp32 accumulation inside the
GEMM, output rounded to the model dtype), the softmax and loss in fp32 (float64 inputs stay
float64 throughout), and the logits' gradient is rounded to the model dtype before the matmul
with the weight, as autograd does through ``.float()``; the ``1/#targets`` and ``grad_output``
factors are applied to the product instead of to the logits' gradient (a rounding in a
different place, within the error budget the tests check). ``reduction="mean"`` divides by the
number of non-ignored targets as ``F.cross_entropy`` does. Unlike ``F.cross_entropy`` (NaN for
"mean", 0 for "sum"), an input with no target to supervise raises ValueError: a loss over
nothing is a caller's bug.

Backends (`sam_fast.ops.dispatch`): ``liger`` (liger-kernel's fused linear cross-entropy, Triton,
CUDA tensors, where ``liger_kernel`` is installed; ``chunk_size`` is then liger's business),
``chunked`` (the PyTorch path above, any device), ``reference`` (`linear_cross_entropy_ref`,
full logits; last in line, so in practice taken only when forced with ``SAM_FAST_BACKEND=reference``).
Under ``torch.compile`` the op runs eagerly (one graph break, no recompilation per batch: the
number of supervised rows sets every shape inside it).
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F

from sam_fast.ops._common import always_usable, dtype_reason
from sam_fast.ops.dispatch import dispatcher, usable_table

REDUCTIONS = ("mean", "sum")
CHUNK_BYTES = 64 * 2**20  # default fp32 logits chunk: chunk_size * V * 4 bytes ~ this


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk so that one fp32 logits chunk is about `CHUNK_BYTES` (64 MiB)."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


# -- validation ---------------------------------------------------------------------------------


def _validate_shapes(hidden, weight, targets, bias, reduction, chunk_size, ignore_index) -> None:
    name = "linear_cross_entropy"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r} is not one of {REDUCTIONS}")
    for arg, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"{name}: hidden must be a floating [M, H] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    M, H = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"{name}: weight must be [V, H] with H={H} (hidden.shape[1]), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight has an empty vocabulary (shape {tuple(weight.shape)})")
    if targets.dim() != 1 or targets.numel() != M:
        raise ValueError(f"{name}: targets must be [M] with M={M} (hidden.shape[0]), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets dtype {targets.dtype} must be int64 or int32")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"{name}: bias must be [{weight.shape[0]}] in {hidden.dtype}, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    for arg, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but hidden is on {hidden.device}")


def _check_targets(targets, vocab: int, ignore_index: int) -> int:
    """Number of supervised targets; ValueError for a target outside [0, V) that is not
    ignore_index, or for no supervised target at all. One host read of two counts."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: targets[{pos}]={int(targets[pos])} is outside [0, {vocab}) "
                         f"and is not ignore_index={ignore_index} ({n_bad} such target(s))")
    if n_valid == 0:
        raise ValueError(f"linear_cross_entropy: every one of the {targets.numel()} targets is ignore_index="
                         f"{ignore_index}: there is nothing to supervise (the mean would be 0/0)")
    return int(n_valid)


def _validate(hidden, weight, targets, bias, reduction, chunk_size, ignore_index) -> int:
    _validate_shapes(hidden, weight, targets, bias, reduction, chunk_size, ignore_index)
    return _check_targets(targets, weight.shape[0], ignore_index)


def _assert_class_ids(targets, vocab: int) -> int:
    """Number of targets when the caller has selected the supervised ones (``checked_targets``):
    their range is asserted on the device (no host read; a CUDA device-side assert, a
    RuntimeError on the CPU); none at all is refused from the shape."""
    if targets.numel() == 0:
        raise ValueError("linear_cross_entropy: no target to supervise (checked_targets=True with 0 targets)")
    torch._assert_async(((targets >= 0) & (targets < vocab)).all(),
                        f"linear_cross_entropy: a target is outside [0, {vocab}) (checked_targets=True "
                        f"promises class ids only)")
    return int(targets.shape[0])


# -- the specification --------------------------------------------------------------------------


def linear_cross_entropy_ref(hidden, weight, targets, bias=None, reduction="mean", chunk_size=None,
                             ignore_index=-100):
    """Plain-PyTorch reference (the specification): full logits ``F.linear(hidden, weight, bias)``
    in the input dtype (what an ``nn.Linear`` lm_head gives), upcast to fp32 (float64 stays
    float64), then ``F.cross_entropy``. Differentiable by autograd. ``chunk_size`` is accepted and unused.

    Raises ValueError on the same inputs as `linear_cross_entropy` (an all-ignored input included).
    """
    _validate(hidden, weight, targets, bias, reduction, chunk_size, ignore_index)
    logits = F.linear(hidden, weight, bias)
    acc = torch.promote_types(logits.dtype, torch.float32)  # .float(), but float64 stays float64
    return F.cross_entropy(logits.to(acc), targets.long(), ignore_index=ignore_index, reduction=reduction)


# -- chunked PyTorch backend -------------------------------------------------------------------


def _chunked_forward(h, weight, t, bias, chunk: int, need_h: bool, need_w: bool, need_b: bool):
    """Summed loss (fp32) of the supervised rows `h` [n, H] with targets `t` [n], and its
    gradients w.r.t. h (model dtype), weight and bias (fp32) where asked for."""
    n, H = h.shape
    V = weight.shape[0]
    need_g = need_h or need_w or need_b
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros(V, H, dtype=acc, device=h.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=h.device) if need_b else None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        hc, tc = h[lo:hi], t[lo:hi, None]
        # logits in the model dtype, log-softmax in fp32 (one fused pass, upcasting as it reads)
        logp = torch.log_softmax(F.linear(hc, weight, bias), dim=1, dtype=acc)
        loss -= logp.gather(1, tc).sum()
        if not need_g:
            continue
        g = logp.exp_()  # softmax, in place
        g.scatter_add_(1, tc, g.new_full(tc.shape, -1.0))  # d loss / d logits = softmax - onehot
        if need_h:
            torch.mm(g.to(h.dtype), weight, out=grad_h[lo:hi])
        if need_w:
            grad_w.addmm_(g.t(), hc.to(acc))
        if need_b:
            grad_b += g.sum(0)
        del g, logp
    return loss, grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every gradient asked for; backward scales them by
    grad_output / divisor (one multiplication of [n, H], not of logits)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, t, divisor, chunk, need_h, need_w, need_b):
        h = hidden if rows is None else hidden.index_select(0, rows)
        loss, gh, gw, gb = _chunked_forward(h, weight, t, bias, chunk, need_h, need_w, need_b)
        ctx.save_for_backward(gh, gw, gb, rows)
        ctx.divisor = divisor
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss if divisor == 1 else loss / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        gh, gw, gb, rows = ctx.saved_tensors
        scale = grad_out if ctx.divisor == 1 else grad_out / ctx.divisor  # fp32 scalar
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0] and gh is not None:
            gh = gh * scale  # computed in fp32, rounded once to the model dtype; exact when scale == 1
            if rows is None:
                d_hidden = gh
            else:
                d_hidden = gh.new_zeros(ctx.hidden_shape).index_copy_(0, rows, gh)
        if ctx.needs_input_grad[1] and gw is not None:
            d_weight = (gw * scale).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2] and gb is not None:
            d_bias = (gb * scale).to(ctx.bias_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def _supervised_rows(targets, ignore_index: int, n_valid: int):
    """(rows or None when every row is supervised, the supervised targets as int64)."""
    t = targets.long()
    if n_valid == targets.numel():
        return None, t
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, t.index_select(0, rows)


def _chunked_backend(hidden, weight, targets, bias=None, reduction="mean", chunk_size=None, ignore_index=-100,
                     n_valid=None):
    if n_valid is None:
        n_valid = _check_targets(targets, weight.shape[0], ignore_index)
    rows, t = _supervised_rows(targets, ignore_index, n_valid)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    divisor = n_valid if reduction == "mean" else 1
    grad = torch.is_grad_enabled()
    need_h = grad and hidden.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    if not (need_h or need_w or need_b):
        with torch.no_grad():
            h = hidden if rows is None else hidden.index_select(0, rows)
            return _chunked_forward(h, weight, t, bias, chunk, False, False, False)[0] / divisor
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, rows, t, divisor, chunk, need_h, need_w, need_b)


# -- liger-kernel backend (optional dependency, CUDA) ------------------------------------------

_LIGER = None  # (function, None) or (None, why not)


def _liger():
    """liger-kernel's functional fused linear cross-entropy, or the reason it is unusable."""
    global _LIGER
    if _LIGER is None:
        _LIGER = _load_liger()
    return _LIGER


def _load_liger():
    try:
        mod = importlib.import_module("liger_kernel.transformers.functional")
    except ImportError as exc:
        return None, f"liger_kernel is not installed ({exc})"
    except Exception as exc:  # installed but broken
        return None, f"liger_kernel failed to import ({type(exc).__name__}: {exc})"
    fn = getattr(mod, "liger_fused_linear_cross_entropy", None)
    if fn is None:
        return None, "liger_kernel has no liger_fused_linear_cross_entropy (too old)"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # old releases alias the autograd Function's apply (positional only)
        return None, "liger_kernel's liger_fused_linear_cross_entropy takes no keywords (too old)"
    missing = [p for p in ("bias", "ignore_index", "reduction") if p not in params]
    if missing:
        return None, f"liger_kernel's liger_fused_linear_cross_entropy lacks {missing} (too old)"
    return fn, None


def _liger_backend(hidden, weight, targets, bias=None, reduction="mean", chunk_size=None, ignore_index=-100,
                   n_valid=None):
    fn, why = _liger()
    if fn is None:
        raise RuntimeError(why)
    if n_valid is None:
        n_valid = _check_targets(targets, weight.shape[0], ignore_index)
    rows, t = _supervised_rows(targets, ignore_index, n_valid)
    h = hidden if rows is None else hidden.index_select(0, rows)  # autograd scatters the gradient back
    out = fn(h.contiguous(), weight, t, bias=bias, ignore_index=ignore_index, reduction=reduction)
    out = out[0] if isinstance(out, tuple) else out  # (loss, z_loss) in some releases
    return out.float()  # the op's contract: an fp32 loss (liger's is fp32 in current releases)


def _reference_backend(hidden, weight, targets, bias=None, reduction="mean", chunk_size=None, ignore_index=-100,
                       n_valid=None):
    logits = F.linear(hidden, weight, bias)
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), targets.long(), ignore_index=ignore_index, reduction=reduction)


# -- backend checks -----------------------------------------------------------------------------

def _check_liger(hidden, weight, targets, bias=None, *args, **kwargs):
    _, why = _liger()
    if why:
        return why
    if hidden.device.type != "cuda":
        return f"inputs on {hidden.device}: liger-kernel's Triton kernels need CUDA tensors"
    return dtype_reason(hidden.dtype)


def _sample():
    h = torch.randn(6, 8)
    return (h, torch.randn(11, 8), torch.tensor([1, -100, 3, 10, -100, 0]), None, "mean"), {}


_dispatch = dispatcher("linear_cross_entropy")
_dispatch.sample = _sample
_dispatch.register("liger", _liger_backend, _check_liger)
_dispatch.register("chunked", _chunked_backend, always_usable)
_dispatch.register("reference", _reference_backend, always_usable)  # last: materialises the [M, V] logits


def linear_cross_entropy_backend(device="cpu", dtype=torch.float32) -> tuple[str, dict[str, str]]:
    """(backend name, {backend: "usable" or why not}) that `linear_cross_entropy` takes for
    inputs in `dtype` on `device` (what ``sam-fast env`` reports)."""
    h = torch.empty(2, 4, dtype=dtype, device=device)
    args = (h, torch.empty(3, 4, dtype=dtype, device=device), torch.zeros(2, dtype=torch.long, device=device))
    return _dispatch.choose(*args).name, usable_table(_dispatch.reasons(*args))


def linear_cross_entropy(hidden, weight, targets, bias=None, reduction="mean", chunk_size=None, ignore_index=-100,
                         *, checked_targets: bool = False):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against `targets` without the full logits
    (module docstring).

    Args:
        hidden: [M, H] final hidden states (after the final norm), any floating dtype.
        weight: [V, H] lm_head weight, same dtype as hidden; frozen or trainable.
        targets: [M] int64/int32 target ids in [0, V), or ignore_index for rows not supervised
            (those rows are dropped before the matmul and get a zero gradient).
        bias: optional [V] lm_head bias (LLaMA has none).
        reduction: "mean" (over the non-ignored targets, as F.cross_entropy) or "sum".
        chunk_size: rows of logits per chunk for the chunked backend (default: a 64 MiB fp32
            chunk, `default_chunk_size`).
        ignore_index: target value that marks an unsupervised row (-100, as F.cross_entropy).
        checked_targets: the caller has kept only supervised rows (every target a class id, none
            ignore_index; e.g. a pack plan's targets): the host read that counts and checks the
            targets is skipped and their range is asserted on the device instead.

    Returns:
        The scalar loss in fp32 (float64 for float64 inputs), differentiable w.r.t. hidden,
        weight and bias (whichever require grad).

    Raises:
        ValueError: naming the bad shape, dtype, device or target value, and when every target is
            ignore_index (nothing to supervise).
    """
    return _linear_cross_entropy_eager(hidden, weight, targets, bias, reduction, chunk_size, ignore_index,
                                       checked_targets)


@torch.compiler.disable
def _linear_cross_entropy_eager(hidden, weight, targets, bias, reduction, chunk_size, ignore_index,
                                checked_targets=False):
    # Opaque to torch.compile: the number of supervised rows is data (it sets every shape inside),
    # so tracing it would graph-break at each host read and recompile for each new count; the
    # work is a few large matmuls that gain nothing from compilation.
    if checked_targets:
        _validate_shapes(hidden, weight, targets, bias, reduction, chunk_size, ignore_index)
        n_valid = _assert_class_ids(targets, weight.shape[0])
    else:
        n_valid = _validate(hidden, weight, targets, bias, reduction, chunk_size, ignore_index)
    backend = _dispatch.choose(hidden, weight, targets, bias, reduction, chunk_size, ignore_index)
    return backend.impl(hidden, weight, targets, bias, reduction, chunk_size, ignore_index, n_valid=n_valid)
