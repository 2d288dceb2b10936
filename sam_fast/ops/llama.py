"""The frozen LLaMA's element-wise layers as fused ops: RMSNorm, SwiGLU and RoPE.

Public ops::

    rms_norm(x [..., D], weight [D], eps) -> [..., D]     # Hugging Face's LlamaRMSNorm
    swiglu(gate [...], up [...]) -> [...]                  # LlamaMLP's silu(gate) * up
    rope(x [B, S, heads, d], cos [B, S, d], sin [B, S, d]) # apply_rotary_pos_emb, any heads at once

`rope` is plain PyTorch on every device (kernels/llama.py has no RoPE kernel); the fused-QKV
attention of `sam_fast.models.llama_kernels` calls it once for the query and key heads together.

`rms_norm_ref` and `swiglu_ref` are the plain-PyTorch specification (Hugging Face's formulas:
RMSNorm's statistics in fp32, the normalised row rounded to the input dtype, then times the
weight, so the output dtype is the promotion of the input's and the weight's; float64 input
stays float64). The ``triton`` backend (``sam_fast._kernels.llama``) computes
each in one pass over the row / element in fp32 with one rounding at the end, and has a fused
backward: the input gradient always, RMSNorm's weight gradient only when the weight requires
grad (a frozen LLM's norms cost no reduction). The ``torch`` backend runs the reference's
forward ops (bit-equal outputs) as an autograd Function with a hand-written backward that saves
only the inputs (and RMSNorm's per-row 1/rms): the memory of the fused kernels, on any device.
Backends (`sam_fast.ops.dispatch`), in order: ``triton`` on CUDA tensors (CPU tensors only under
``TRITON_INTERPRET=1`` with ``SAM_FAST_BACKEND=triton``, for tests), ``torch`` (not while
torch.compile traces: the compiler fuses the reference's graph itself), ``reference``. All are
differentiable w.r.t. every input.

`sam_fast.models.llama_kernels.apply_fused_llama_kernels` patches a LLaMA's modules to call
these ops.
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
from sam_fast.ops.dispatch import dispatcher, usable_table

RMS_NORM_MAX_D = 16384  # one program holds whole rows of next_pow2(D) fp32 values


# -- the specification ---------------------------------------------------------------------------


def rms_norm_ref(x, weight, eps=1e-6):
    """Hugging Face's LlamaRMSNorm in plain PyTorch: ``weight * (x * rsqrt(mean(x^2) + eps))`` with
    the statistics in fp32 (float64 stays float64) and the normalised row cast back to x's dtype
    before the product. Differentiable by autograd."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu_ref(gate, up):
    """LlamaMLP's activation ``silu(gate) * up`` in plain PyTorch (in the inputs' dtype, as HF)."""
    return torch.nn.functional.silu(gate) * up


# -- the lean autograd backend ("torch") ----------------------------------------------------------
# The same formulas in plain PyTorch ops, as autograd Functions with hand-written backwards that
# keep only what the gradient needs: RMSNorm saves its input and the per-row 1/rms (autograd of the
# reference keeps the input, the normalised row and two per-row statistics), SwiGLU its two inputs
# (autograd keeps silu(gate) as well). A frozen LLaMA's training step keeps one such set per layer
# for the backward, so this is about 30% less of the step's activation memory, on any device.


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(x.dtype, torch.float32)
        h = x.to(acc)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        h = x.to(rstd.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # n = h * rstd, rstd = (mean(h^2) + eps)^-1/2:  dh = rstd * (dn - n * mean(dn * n))
            dn = (grad * weight).to(rstd.dtype)
            dot = (dn * h).mean(-1, keepdim=True).mul_(rstd * rstd)
            dx = (dn - h * dot).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (grad * (h * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        # The ops autograd of the reference runs (mul's backward, then silu's fused backward), with
        # silu(gate) recomputed instead of kept: the same values as HF's gradients, bit for bit.
        gate, up = ctx.saved_tensors
        d_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


def _rms_torch_backend(x, weight, eps=1e-6):
    return _RMSNormFn.apply(x, weight, float(eps))


def _swiglu_torch_backend(gate, up):
    return _SwiGLUFn.apply(gate, up)


def _check_torch(*args, **kwargs):
    if torch.compiler.is_compiling():
        return "under torch.compile the reference's autograd graph is what the compiler fuses"
    return None


# -- validation ----------------------------------------------------------------------------------


def _validate_rms_norm(x, weight, eps) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"rms_norm: x and weight must be tensors, got {type(x).__name__}, {type(weight).__name__}")
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be a floating [..., D] tensor, got {x.dtype} {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D or not weight.is_floating_point():
        raise ValueError(f"rms_norm: weight must be a floating [D] tensor with D={D} (x.shape[-1]), "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"rms_norm: eps must be a number >= 0, got {eps!r}")


def _validate_swiglu(gate, up) -> None:
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"swiglu: gate and up must be tensors, got {type(gate).__name__}, {type(up).__name__}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must share one floating dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")


# -- Triton launchers ----------------------------------------------------------------------------


def _rms_blocks(M: int, D: int, tiles: int, interpret: bool):
    """(BLOCK_M, BLOCK_D, num_warps): on a GPU a program holds `tiles` fp32 [BLOCK_M, BLOCK_D]
    tiles in registers (about 8192 values in all; one row when a row alone is more); under the
    interpreter (`interpret`: milliseconds per program) one program takes up to 2^20 values."""
    block_d = next_pow2(D)
    budget = max(1, ((1 << 20) if interpret else 8192 // tiles) // block_d)  # rows per program
    block_m = min(next_pow2(max(M, 1)), 1 << (budget.bit_length() - 1))  # a power of 2
    return block_m, block_d, 8 if block_d >= 2048 else 4


def _elementwise_block(N: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of the SwiGLU kernels (`interpret`: under the CPU interpreter)."""
    if interpret:
        return min(next_pow2(max(N, 1)), 1 << 20), 4
    return 1024, 4


def _rms_norm_forward(x, weight, eps):
    from sam_fast._kernels.llama import rms_norm_fwd_kernel

    D = x.shape[-1]
    X = x.contiguous().view(-1, D)
    M = X.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0 or D == 0:
        return y, rstd
    block_m, block_d, warps = _rms_blocks(M, D, 2, interpret=interpreting())
    rms_norm_fwd_kernel[(cdiv(M, block_m),)](
        X, weight.contiguous(), y, rstd, M, D, float(eps), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return y, rstd


def _rms_norm_backward(grad, x, weight, rstd, weight_grad):
    from sam_fast._kernels.llama import rms_norm_bwd_kernel

    D = x.shape[-1]
    X = x.contiguous().view(-1, D)
    M = X.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if M == 0 or D == 0:
        return dx, torch.zeros(D if weight_grad else 0, dtype=torch.float32, device=x.device)
    G = grad.contiguous().view(-1, D)
    block_m, block_d, warps = _rms_blocks(M, D, 4, interpret=interpreting())
    grid = cdiv(M, block_m)
    partial = torch.empty((grid, D) if weight_grad else (0,), dtype=torch.float32, device=x.device)
    rms_norm_bwd_kernel[(grid,)](
        G, X, weight.contiguous(), rstd, dx, partial, M, D,
        WEIGHT_GRAD=weight_grad, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return dx, (partial.sum(0) if weight_grad else partial)


def _swiglu_forward(gate, up):
    from sam_fast._kernels.llama import swiglu_fwd_kernel

    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    N = gate.numel()
    if N == 0:
        return y
    block, warps = _elementwise_block(N, interpret=interpreting())
    swiglu_fwd_kernel[(cdiv(N, block),)](gate.contiguous(), up.contiguous(), y, N, BLOCK=block,
                                         num_warps=warps)
    return y


def _swiglu_backward(grad, gate, up):
    from sam_fast._kernels.llama import swiglu_bwd_kernel

    d_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    N = gate.numel()
    if N == 0:
        return d_gate, d_up
    block, warps = _elementwise_block(N, interpret=interpreting())
    swiglu_bwd_kernel[(cdiv(N, block),)](grad.contiguous(), gate.contiguous(), up.contiguous(), d_gate,
                                         d_up, N, BLOCK=block, num_warps=warps)
    return d_gate, d_up


# -- torch.library ops (opaque to torch.compile; fake implementations give shapes) ---------------


@torch.library.custom_op("sam_fast::rms_norm_triton_fwd", mutates_args=())
def _rms_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_forward(x, weight, eps)


@_rms_fwd_op.register_fake
def _(x, weight, eps):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("sam_fast::rms_norm_triton_bwd", mutates_args=())
def _rms_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_backward(grad, x, weight, rstd, weight_grad)


@_rms_bwd_op.register_fake
def _(grad, x, weight, rstd, weight_grad):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1] if weight_grad else 0, dtype=torch.float32)


def _rms_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    dx, dw = _rms_bwd_op(grad, x, weight, rstd, weight_grad)
    return (dx if ctx.needs_input_grad[0] else None, dw.to(weight.dtype) if weight_grad else None, None)


torch.library.register_autograd("sam_fast::rms_norm_triton_fwd", _rms_backward, setup_context=_rms_setup_context)


@torch.library.custom_op("sam_fast::swiglu_triton_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _swiglu_forward(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("sam_fast::swiglu_triton_bwd", mutates_args=())
def _swiglu_bwd_op(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_backward(grad, gate, up)


@_swiglu_bwd_op.register_fake
def _(grad, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward_rule(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _swiglu_bwd_op(grad, gate, up)
    return (d_gate if ctx.needs_input_grad[0] else None, d_up if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("sam_fast::swiglu_triton_fwd", _swiglu_backward_rule,
                                setup_context=_swiglu_setup_context)


# -- backends and their checks -------------------------------------------------------------------


def _check_rms_triton(x, weight, eps=1e-6):
    why = (triton_device_reason(x.device) or triton_import_error() or dtype_reason(x.dtype)
           or dtype_reason(weight.dtype))
    if why:
        return why
    if x.shape[-1] > RMS_NORM_MAX_D:
        return f"D={x.shape[-1]} > {RMS_NORM_MAX_D} (one program holds whole rows)"
    return None


def _check_swiglu_triton(gate, up):
    return triton_device_reason(gate.device) or triton_import_error() or dtype_reason(gate.dtype)


def _rms_triton_backend(x, weight, eps=1e-6):
    return _rms_fwd_op(x, weight, float(eps))[0]


def _swiglu_triton_backend(gate, up):
    return _swiglu_fwd_op(gate, up)


_rms_dispatch = dispatcher("rms_norm")
_rms_dispatch.sample = lambda: ((torch.randn(3, 8), torch.ones(8), 1e-6), {})
_rms_dispatch.register("triton", _rms_triton_backend, _check_rms_triton)
_rms_dispatch.register("torch", _rms_torch_backend, _check_torch)
_rms_dispatch.register("reference", rms_norm_ref, always_usable)

_swiglu_dispatch = dispatcher("swiglu")
_swiglu_dispatch.sample = lambda: ((torch.randn(3, 8), torch.randn(3, 8)), {})
_swiglu_dispatch.register("triton", _swiglu_triton_backend, _check_swiglu_triton)
_swiglu_dispatch.register("torch", _swiglu_torch_backend, _check_torch)
_swiglu_dispatch.register("reference", swiglu_ref, always_usable)


def rms_norm_backend(device="cpu", dtype=torch.float32, hidden_size: int = 4096) -> tuple[str, dict[str, str]]:
    """(backend name, {backend: "usable" or why not}) that `rms_norm` takes for [*, hidden_size]
    inputs in `dtype` on `device` (what ``sam-fast env`` and the LLaMA patch report)."""
    args = (torch.empty(2, hidden_size, dtype=dtype, device=device), torch.empty(hidden_size, dtype=dtype, device=device),
            1e-6)
    return _rms_dispatch.choose(*args).name, usable_table(_rms_dispatch.reasons(*args))


def swiglu_backend(device="cpu", dtype=torch.float32) -> tuple[str, dict[str, str]]:
    """(backend name, {backend: "usable" or why not}) that `swiglu` takes for inputs in `dtype`
    on `device`."""
    args = (torch.empty(2, 8, dtype=dtype, device=device), torch.empty(2, 8, dtype=dtype, device=device))
    return _swiglu_dispatch.choose(*args).name, usable_table(_swiglu_dispatch.reasons(*args))


# -- public ops ----------------------------------------------------------------------------------


def rms_norm(x, weight, eps=1e-6):
    """Hugging Face's LlamaRMSNorm: ``weight * (x / sqrt(mean(x^2, -1) + eps))`` (module docstring
    for the rounding), fused on the ``triton`` backend.

    Args:
        x: [..., D] floating tensor (any leading shape; made contiguous if it is not).
        weight: [D] floating tensor on x's device (frozen or trainable).
        eps: the variance epsilon (``LlamaRMSNorm.variance_epsilon``).

    Returns:
        [..., D] in ``torch.promote_types(x.dtype, weight.dtype)``, differentiable w.r.t. x and
        weight (the weight gradient is computed only when the weight requires grad).

    Raises:
        ValueError: naming the bad shape, dtype, device or eps.
    """
    if not torch.compiler.is_compiling():
        _validate_rms_norm(x, weight, eps)
    return _rms_dispatch(x, weight, eps)


def swiglu(gate, up):
    """``silu(gate) * up`` (LlamaMLP's activation), fused on the ``triton`` backend.

    Args:
        gate: the ``gate_proj`` output, any shape, floating.
        up: the ``up_proj`` output, same shape, dtype and device.

    Returns:
        A tensor of that shape and dtype, differentiable w.r.t. both inputs.

    Raises:
        ValueError: naming the mismatching shapes, dtypes or devices.
    """
    if not torch.compiler.is_compiling():
        _validate_swiglu(gate, up)
    return _swiglu_dispatch(gate, up)


def rope(x, cos, sin):
    """Rotary position embedding of Hugging Face's ``apply_rotary_pos_emb`` on heads laid out
    ``[B, S, heads, d]`` (as a fused Q/K projection's output is), so the query and key heads of a
    layer rotate in one call; the same element-wise formula ``x * cos + rotate_half(x) * sin``,
    hence bit-equal to Hugging Face's per-head results. Differentiable w.r.t. x (autograd keeps
    only cos and sin, which the layers share).

    Args:
        x: [B, S, heads, d] floating tensor (d even; any strides, e.g. a split view).
        cos, sin: [B, S, d] (or broadcastable, e.g. [1, S, d]) from ``LlamaRotaryEmbedding``.

    Returns:
        [B, S, heads, d] in the promotion of x's and cos's dtypes (x's for the model's own cos).

    Raises:
        ValueError: naming the shapes when d is odd or cos/sin do not match x's last dim.
    """
    if not torch.compiler.is_compiling():
        d = x.shape[-1] if x.dim() else 0
        if x.dim() < 3 or d % 2 or cos.shape[-1] != d or sin.shape != cos.shape:
            raise ValueError(f"rope: x must be [B, S, heads, d] with d even and cos/sin [B, S, d]; got x "
                             f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
