"""Triton kernels of the frozen LLaMA's element-wise layers: RMSNorm and SwiGLU, forward and backward.

The launchers, autograd and torch.library registration live in `sam_fast.ops.llama`; the
plain-PyTorch references there (`rms_norm_ref`, `swiglu_ref`) are the specification.

RMSNorm (Hugging Face's ``LlamaRMSNorm``): rows of width D, ``n = x * rstd`` with
``rstd = 1 / sqrt(mean(x^2) + eps)`` computed in fp32, ``n`` rounded to the input dtype, then
``y = w * n`` rounded to the output dtype. One program = BLOCK_M whole rows (BLOCK_D =
next_pow2(D)). The forward also writes ``rstd`` (fp32, one per row) for the backward.
Backward: ``dn = dy * w``, ``dx = rstd * (dn - n * mean(dn * n))`` in fp32 (n unrounded here);
with WEIGHT_GRAD each program writes its rows' ``sum(dy * n_rounded)`` to one row of a
[programs, D] fp32 buffer that the launcher sums (no atomics: deterministic). A frozen weight
skips that work.

SwiGLU (``LlamaMLP``'s ``silu(gate) * up``): element-wise over the flattened tensors, fp32
inside, one rounding to the output dtype (PyTorch rounds silu's output, then the product).
Backward: ``d up = dy * silu(a)``, ``d gate = dy * up * s * (1 + a * (1 - s))`` with
``s = sigmoid(a)``.

Offsets are int64 (a [tokens, 11008] activation of a long batch passes 2^31 elements). Loads are
cast to fp32 right away (bf16 arithmetic is broken in the CPU interpreter).
"""

import triton
import triton.language as tl

from sam_fast._kernels._common import _row_block


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, RSTD, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols, rmask, cmask, mask, offs = _row_block(pid, M, D, BLOCK_M, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # HF rounds to the input dtype
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = n * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, M, D,
    WEIGHT_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, rmask, cmask, mask, offs = _row_block(pid, M, D, BLOCK_M, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    n = x * rstd[:, None]
    dn = dy * w[None, :]
    c = tl.sum(dn * n, axis=1) / D
    dx = (dn - n * c[:, None]) * rstd[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if WEIGHT_GRAD:
        nr = n.to(X.dtype.element_ty).to(tl.float32)
        dw = tl.sum(dy * nr, axis=0)  # masked rows hold dy = 0
        tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw, mask=cmask)


@triton.jit
def swiglu_fwd_kernel(A, B, Y, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(DY, A, B, DA, DB, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)
    tl.store(DA + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
