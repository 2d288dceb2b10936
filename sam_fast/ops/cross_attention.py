"""Q-former attention (self and cross) behind one op boundary.

Public op::

    cross_attention(query [N,H,Lq,d], key [N,H,Lk,d], value [N,H,Lk,d],
                    attn_bias [N,1,1|Lq,Lk] | None, dropout_p=0.0, scale=None) -> [N,H,Lq,d]

``softmax(q k^T * scale + attn_bias) v`` per row, with ``scale = d ** -0.5`` by default and
dropout on the probabilities in training (as HF's Q-former). In the Q-former the 32 query rows of
every image (and, in the W-stream, of every contextual row) attend to the 257 image tokens.

Backends, in order of preference (``sam-fast env`` explains the choice):

- ``triton``: the fused kernel of `sam_fast/_kernels/cross_attention.py` (forward, and a backward that
  recomputes the probabilities), registered as ``torch.ops.sam_fast.cross_attention_fwd/_bwd``
  with fake implementations and autograd. Reads strided q/k/v in place (e.g. the K/V columns of
  the one-GEMM projection), writes the output in [N, Lq, H, d] memory so the caller's head merge
  is a free view. Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` *and* when forced with
  ``SAM_FAST_BACKEND=triton`` (the interpreter costs milliseconds per program: tests only).
  Needs: fp32/fp16/bf16, head dim a multiple of 8 (<= 256), no dropout, a key-padding bias
  [N,1,1,Lk] or none, no gradient wanted for the bias.
- ``reference``: `torch.nn.functional.scaled_dot_product_attention`, everything else.
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

import sam_fast.ops._common as _common
from sam_fast.ops._common import always_usable as _check_reference
from sam_fast.ops._common import cdiv as triton_cdiv
from sam_fast.ops._common import dtype_reason, triton_device_reason, triton_forced, triton_import_error
from sam_fast.ops._common import next_pow2 as triton_next_pow2
from sam_fast.ops.dispatch import dispatcher, forced_backend


def cross_attention_ref(query, key, value, attn_bias=None, dropout_p=0.0, scale=None):
    """Reference: SDPA (math or fused, PyTorch's choice), same formula as HF's eager path.

    K/V are often strided views of the one K/V buffer of all cross layers; CUDA's fused SDPA
    kernels refuse rows that are not aligned ("key is not correctly aligned (strideM)", seen on
    an H200), so on CUDA non-contiguous K/V are copied first (this fallback path only)."""
    if key.is_cuda and not key.is_contiguous():
        key = key.contiguous()
    if value.is_cuda and not value.is_contiguous():
        value = value.contiguous()
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)


# -- Triton backend ---------------------------------------------------------------------------

# The Triton probe and the interpreter rule are `sam_fast.ops._common`'s. `_interpreter_allowed` is
# this op's test seam: tests patch it to run the model through the interpreter without forcing
# every op's Triton backend.
_triton_import_error = triton_import_error


def _interpreter_allowed() -> bool:
    """Whether CPU tensors may take the Triton backend under TRITON_INTERPRET=1 (the rule's
    "Triton backend forced" half, `_common.triton_forced`, unless a test patches this)."""
    return triton_forced()


def _triton_config_reason(device_type: str, dtype: torch.dtype, head_dim: int, dropout_p: float = 0.0) -> str | None:
    """Why the kernel cannot run attention of this kind (None: it can), from the device type, the
    dtype, the head dim and the dropout alone, no tensor needed: the part of `_check_triton` a
    caller can ask once, before it has inputs (`mixes_in_kernel`)."""
    why = triton_import_error() or triton_device_reason(device_type, _interpreter_allowed()) or dtype_reason(dtype)
    if why:
        return why
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} is not a multiple of 8 up to 256"
    if dropout_p:
        return f"dropout_p={dropout_p}: the kernel has no dropout (training with attention dropout uses SDPA)"
    return None


def _check_triton(query, key, value, attn_bias=None, dropout_p=0.0, scale=None):
    dev = query.device
    why = _triton_config_reason(dev.type, query.dtype, query.shape[-1], dropout_p)
    if why:
        return why
    if any(t.device != dev for t in (key, value)):
        return "query, key and value are on different devices"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}: need one of fp32, fp16, bf16 for all three"
    if attn_bias is not None:
        N, _, Lk, _ = key.shape
        if attn_bias.dim() != 4 or attn_bias.shape[1:3] != (1, 1) or attn_bias.shape[-1] != Lk \
                or attn_bias.shape[0] not in (1, N):
            return f"attn_bias {tuple(attn_bias.shape)} is not a key-padding bias [N, 1, 1, Lk]"
        if attn_bias.requires_grad and torch.is_grad_enabled():
            return "attn_bias requires grad (the kernel gives no bias gradient)"
        if attn_bias.device != dev:
            return "attn_bias is on another device"
    return None


def _blocks(Lq: int, Lk: int, d: int, interpret: bool, dtype: torch.dtype = torch.float32
            ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_stages). Dot blocks >= 16 (the interpreter accepts smaller ones, GPUs do not); under the interpreter,
    big blocks (each program instance costs milliseconds there). On a GPU the K/V tiles of the
    software pipeline live in shared memory, so wide heads take narrower key blocks and fewer
    stages: checked against the per-block limits of sm_80 (163 KB) and sm_90 (227 KB) by
    tests/test_triton_gpu_compile.py, which compiles every launch for both."""
    block_d = max(16, triton_next_pow2(d))
    if interpret:
        return max(16, min(128, triton_next_pow2(Lq))), max(16, min(256, triton_next_pow2(Lk))), block_d, 1
    block_m = max(16, min(64, triton_next_pow2(Lq)))
    block_n = max(16, min(64, triton_next_pow2(Lk)))
    stages = 3
    wide = block_d * (4 if dtype == torch.float32 else 2)  # bytes of one tile row
    if wide >= 512:  # fp32 d=128, half d=256
        block_m, block_n, stages = min(block_m, 32), min(block_n, 32), 2
    if wide >= 1024:  # fp32 d=256
        stages = 1
    return block_m, block_n, block_d, stages


def _bias_args(attn_bias, q):
    if attn_bias is None:
        return q, 0, 0, False  # any pointer; never read
    b = attn_bias[:, 0, 0, :]
    return b, (b.stride(0) if b.shape[0] > 1 else 0), b.stride(1), True


def _precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _kv_args(key, value, key2, value2, rows2, split, mix_index=None, mix_weight=None):
    """Pointer/stride arguments of the two K/V sources (the second defaults to the first) and of
    the mixing plan (slots M = mix_index.shape[1]; pointers never read without one)."""
    if key2 is None:
        key2, value2 = key, value
    rows = rows2 if rows2 is not None else key  # any pointer; never read
    if mix_index is None:
        mix_index, mix_weight, slots = key, key, 0
    else:
        slots = mix_index.shape[1]
    return (*key.stride(), *value.stride(), key2, value2, rows, split, mix_index, mix_weight, slots,
            *key2.stride(), *value2.stride())


@torch.library.custom_op("sam_fast::cross_attention_fwd", mutates_args=())
def _triton_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key2: torch.Tensor | None,
                value2: torch.Tensor | None, rows2: torch.Tensor | None, split: int,
                attn_bias: torch.Tensor | None, scale: float, mix_index: torch.Tensor | None = None,
                mix_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows [0, split) attend to key/value rows [0, split); rows [split, N) to key2/value2
    row ``n - split`` (or ``rows2[n - split]``), or with a mixing plan (mix_index [N - split, M]
    int32, mix_weight [N - split, M, Lk] fp32, contiguous) to ``sum_s mix_weight[j, s, :] *
    key2[mix_index[j, s]]`` formed on the fly. Returns (out, lse)."""
    from sam_fast._kernels.cross_attention import attn_fwd_kernel

    N, H, Lq, d = query.shape
    Lk = key.shape[2]
    interpret = query.device.type == "cpu"
    bm, bn, bd, stages = _blocks(Lq, Lk, d, interpret, query.dtype)
    out = torch.empty(N, Lq, H, d, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = torch.empty(N * H, Lq, dtype=torch.float32, device=query.device)
    bias, sbn, sbk, has_bias = _bias_args(attn_bias, query)
    grid = (triton_cdiv(Lq, bm), N * H)
    attn_fwd_kernel[grid](
        query, key, value, bias, out, lse,
        *query.stride(), *_kv_args(key, value, key2, value2, rows2, split, mix_index, mix_weight),
        *out.stride(), sbn, sbk,
        H, Lq, Lk, d, scale,
        HAS_BIAS=has_bias, HAS_ROWS2=rows2 is not None, HAS_MIX=mix_index is not None,
        PRECISION=_precision(query.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_stages=stages,
    )
    return out, lse


@_triton_fwd.register_fake
def _(query, key, value, key2, value2, rows2, split, attn_bias, scale, mix_index=None, mix_weight=None):
    N, H, Lq, d = query.shape
    out = query.new_empty(N, Lq, H, d).transpose(1, 2)
    return out, query.new_empty(N * H, Lq, dtype=torch.float32)


@torch.library.custom_op("sam_fast::cross_attention_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key2: torch.Tensor | None, value2: torch.Tensor | None, rows2: torch.Tensor | None, split: int,
                attn_bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                scale: float, mix_index: torch.Tensor | None = None,
                mix_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [N,H,Lq,d], dk, dv [N,H,Lk,d]): dk/dv one slice per query row, in fp32 (for a mixed
    row: the gradient of its mixed K/V)."""
    from sam_fast._kernels.cross_attention import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel

    N, H, Lq, d = query.shape
    Lk = key.shape[2]
    interpret = query.device.type == "cpu"
    bm, bn, bd, stages = _blocks(Lq, Lk, d, interpret, query.dtype)
    delta = (grad_out.float() * out.float()).sum(-1).reshape(N * H, Lq)  # rowsum(dO * O)
    dq = torch.empty(N, H, Lq, d, dtype=query.dtype, device=query.device)
    dk = torch.empty(N, H, Lk, d, dtype=torch.float32, device=query.device)
    dv = torch.empty(N, H, Lk, d, dtype=torch.float32, device=query.device)
    bias, sbn, sbk, has_bias = _bias_args(attn_bias, query)
    common = (*query.stride(), *_kv_args(key, value, key2, value2, rows2, split, mix_index, mix_weight),
              *grad_out.stride(), sbn, sbk, H, Lq, Lk, d, scale)
    meta = dict(HAS_BIAS=has_bias, HAS_ROWS2=rows2 is not None, HAS_MIX=mix_index is not None,
                PRECISION=_precision(query.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_stages=stages)
    attn_bwd_dkdv_kernel[(triton_cdiv(Lk, bn), N * H)](
        query, key, value, bias, grad_out, lse, delta, dk, dv, *common, **meta)
    attn_bwd_dq_kernel[(triton_cdiv(Lq, bm), N * H)](
        query, key, value, bias, grad_out, lse, delta, dq, *common, **meta)
    return dq, dk, dv


@_triton_bwd.register_fake
def _(grad_out, query, key, value, key2, value2, rows2, split, attn_bias, out, lse, scale, mix_index=None,
      mix_weight=None):
    N, H, _, d = query.shape
    Lk = key.shape[2]
    f32 = dict(dtype=torch.float32, device=query.device)
    return torch.empty_like(query), torch.empty(N, H, Lk, d, **f32), torch.empty(N, H, Lk, d, **f32)


@torch.library.custom_op("sam_fast::mix_weight_grad", mutates_args=())
def _mix_weight_grad(dk_hat: torch.Tensor, dv_hat: torch.Tensor, key2: torch.Tensor, value2: torch.Tensor,
                     mix_index: torch.Tensor) -> torch.Tensor:
    """d mix_weight [R, M, Lk] (fp32) from the mixed rows' dK-hat/dV-hat [R, H, Lk, d] (fp32,
    contiguous): ``sum_{h,d} dK-hat[j] * key2[idx[j, s]] + dV-hat[j] * value2[idx[j, s]]``, one
    Triton launch (`mix_weight_grad_kernel`)."""
    from sam_fast._kernels.cross_attention import mix_weight_grad_kernel

    R, H, Lk, d = dk_hat.shape
    M = mix_index.shape[1]
    dw = torch.empty(R, M, Lk, dtype=torch.float32, device=dk_hat.device)
    interpret = dk_hat.device.type == "cpu"
    block_d = max(16, triton_next_pow2(d))
    block_n = max(16, min(256 if interpret else 64, triton_next_pow2(Lk)))
    if R and M:
        mix_weight_grad_kernel[(triton_cdiv(Lk, block_n), R)](
            dk_hat.contiguous(), dv_hat.contiguous(), key2, value2, mix_index, dw,
            *key2.stride(), *value2.stride(), H, Lk, d, M, BLOCK_N=block_n, BLOCK_D=block_d)
    return dw


@_mix_weight_grad.register_fake
def _(dk_hat, dv_hat, key2, value2, mix_index):
    return dk_hat.new_empty(dk_hat.shape[0], mix_index.shape[1], dk_hat.shape[2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    query, key, value, key2, value2, rows2, split, attn_bias, scale, mix_index, mix_weight = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, key2, value2, rows2, attn_bias, out, lse, mix_index, mix_weight)
    ctx.split, ctx.scale = split, scale


def mix_kv_backward(dk_hat, dv_hat, key2, value2, mix_index, mix_weight):
    """Gradients of key2/value2 through ``k_hat[j] = sum_s w[j, s, :] * key2[idx[j, s]]`` (same for
    v), from the mixed rows' dK-hat/dV-hat [R, H, Lk, d] (fp32): a scatter-add per slot, in fp32.
    Only needed when the K/V require grad (never for SAM's frozen Q-former); the weights' gradient
    is `_mix_weight_grad`."""
    dk2 = torch.zeros(key2.shape, dtype=torch.float32, device=key2.device)
    dv2 = torch.zeros(value2.shape, dtype=torch.float32, device=value2.device)
    for slot in range(mix_index.shape[1]):
        idx = mix_index[:, slot].long()
        a = mix_weight[:, slot, None, :, None].float()
        dk2.index_add_(0, idx, a * dk_hat)
        dv2.index_add_(0, idx, a * dv_hat)
    return dk2, dv2


def _backward(ctx, grad_out, grad_lse):
    query, key, value, key2, value2, rows2, attn_bias, out, lse, mix_index, mix_weight = ctx.saved_tensors
    s = ctx.split
    dq, dk, dv = _triton_bwd(grad_out, query, key, value, key2, value2, rows2, s, attn_bias, out, lse, ctx.scale,
                             mix_index, mix_weight)
    dk1, dv1 = dk[:s].to(key.dtype), dv[:s].to(value.dtype)
    dk2 = dv2 = dw = None
    if mix_index is not None:
        need = ctx.needs_input_grad
        if need[3] or need[4]:  # K/V that require grad (not SAM's frozen Q-former): gathered in PyTorch
            dk2, dv2 = mix_kv_backward(dk[s:], dv[s:], key2, value2, mix_index, mix_weight)
            dk2, dv2 = dk2.to(key2.dtype), dv2.to(value2.dtype)
        if need[10]:
            dw = _mix_weight_grad(dk[s:], dv[s:], key2, value2, mix_index).to(mix_weight.dtype)
    elif key2 is not None:
        if rows2 is None:
            dk2, dv2 = dk[s:].to(key2.dtype), dv[s:].to(value2.dtype)
        else:  # query rows sharing a K/V row: sum their slices
            idx = rows2.long()
            dk2 = dk.new_zeros(key2.shape).index_add_(0, idx, dk[s:]).to(key2.dtype)
            dv2 = dv.new_zeros(value2.shape).index_add_(0, idx, dv[s:]).to(value2.dtype)
    return dq, dk1, dv1, dk2, dv2, None, None, None, None, None, dw


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_attention_triton(query, key, value, attn_bias=None, dropout_p=0.0, scale=None):
    """The fused Triton kernel (see module docstring); callers check `_check_triton` first."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if attn_bias is not None:
        attn_bias = attn_bias.to(torch.float32).expand(key.shape[0], 1, 1, key.shape[2])
    return _triton_fwd(query, key, value, None, None, None, query.shape[0], attn_bias, float(scale))[0]


def _sample():
    q = torch.randn(2, 2, 4, 8)
    k = torch.randn(2, 2, 6, 8)
    return (q, k, k.clone()), {}


_dispatch = dispatcher("cross_attention")
_dispatch.sample = _sample
_dispatch.register("triton", cross_attention_triton, _check_triton)
_dispatch.register("reference", cross_attention_ref, _check_reference)


# -- both streams in one call -------------------------------------------------------------------

class MixPlan(NamedTuple):
    """A mixing plan of `cross_attention_streams` (``mix=``): second-stream query row j attends to
    the K/V ``sum_s weight[j, s, :] * key2[index[j, s]]``; unused slots carry weight 0. A tuple, so
    ``index, weight = plan`` and plain ``(index, weight)`` tuples keep working."""

    index: torch.Tensor  # [R, M] int32/int64: the K/V rows of each slot
    weight: torch.Tensor  # [R, M, Lk] floating: each slot's weight per key position


def mix_kv(key2, value2, mix):
    """Materialise the mixed K/V of a mixing plan: ``k_hat[j] = sum_s weight[j, s, :] *
    key2[index[j, s]]`` (same for v) -> ([R, H, Lk, d], [R, H, Lk, d]) in key2's dtype
    (accumulated in fp32 or better)."""
    index, weight = mix
    acc = torch.promote_types(key2.dtype, torch.float32)
    k = v = 0
    for slot in range(index.shape[1]):
        idx = index[:, slot].long()
        a = weight[:, slot, None, :, None].to(acc)
        k = k + a * key2.index_select(0, idx).to(acc)
        v = v + a * value2.index_select(0, idx).to(acc)
    return k.to(key2.dtype), v.to(value2.dtype)


def cross_attention_streams_ref(query, key, value, key2=None, value2=None, rows2=None, dropout_p=0.0, scale=None,
                                mix=None):
    """Reference: one SDPA per stream (the second stream's K/V rows gathered by `rows2`, or mixed
    by `mix` and materialised)."""
    split = key.shape[0]
    outs = [cross_attention_ref(query[:split], key, value, None, dropout_p, scale)] if split else []
    if key2 is not None:
        if mix is not None:
            key2, value2 = mix_kv(key2, value2, mix)
        elif rows2 is not None:
            key2, value2 = key2.index_select(0, rows2), value2.index_select(0, rows2)
        outs.append(cross_attention_ref(query[split:], key2, value2, None, dropout_p, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _check_streams_triton(query, key, value, key2=None, value2=None, rows2=None, dropout_p=0.0, scale=None,
                          mix=None):
    split = key.shape[0]
    why = _check_triton(query[:split], key, value, None, dropout_p, scale)
    if why or key2 is None:
        return why
    second_rows = query.shape[0] - split
    if rows2 is None and mix is None:
        second_key, second_value = key2, value2
    else:  # one K/V row per query row, as `_check_triton` expects (shapes only: expanded views)
        second_key = key2[:1].expand(second_rows, -1, -1, -1)
        second_value = value2[:1].expand(second_rows, -1, -1, -1)
    why = _check_triton(query[split:], second_key, second_value, None, dropout_p, scale)
    if why:
        return f"second stream: {why}"
    if key2.shape[1:] != key.shape[1:]:
        return f"the streams' K/V shapes differ: {tuple(key.shape)} vs {tuple(key2.shape)}"
    if mix is not None and any(t.device != query.device for t in mix):  # (a MixPlan or a plain pair)
        return "the mixing plan is on another device"
    return _sdpa_preferred(query.device.type, mixed=mix is not None)


# On a GPU one SDPA call per plain stream beats both streams in one launch of the fused kernel,
# while forming mixed (leave_one_out) K/V in the kernel beats materialising them for SDPA: the
# measurements are in docs/performance.md ("Two attention streams on an H200").
_PLAIN_STREAMS_SLOWER = ("no mixing plan: on a GPU one SDPA call per stream is faster than the fused kernel "
                         "(docs/performance.md); the kernel is taken where it forms mixed K/V")


def _sdpa_preferred(device_type: str, mixed: bool) -> str | None:
    """Why the streams should not take the fused kernel on `device_type` (None: take it). Plain
    streams on CUDA go to SDPA unless the Triton backend is forced (``SAM_FAST_BACKEND=triton``)."""
    if device_type == "cuda" and not mixed and not triton_forced():
        return _PLAIN_STREAMS_SLOWER
    return None


def cross_attention_streams_triton(query, key, value, key2=None, value2=None, rows2=None, dropout_p=0.0, scale=None,
                                   mix=None):
    """Both streams in one launch of the fused kernel (mixed K/V formed in the kernel)."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if rows2 is not None:
        rows2 = rows2.to(torch.int32)
    mix_index = mix_weight = None
    if mix is not None:
        index, weight = mix  # (a MixPlan or a plain pair)
        mix_index = index.to(torch.int32).contiguous()
        mix_weight = weight.to(torch.float32).contiguous()
    return _triton_fwd(query, key, value, key2, value2, rows2, key.shape[0], None, float(scale),
                       mix_index, mix_weight)[0]


def _streams_sample():
    q = torch.randn(3, 2, 4, 8)
    k = torch.randn(2, 2, 6, 8)
    k2 = torch.randn(1, 2, 6, 8)
    return (q, k, k.clone(), k2, k2.clone(), None), {}


_streams = dispatcher("cross_attention_streams")
_streams.sample = _streams_sample
_streams.register("triton", cross_attention_streams_triton, _check_streams_triton)
_streams.register("reference", cross_attention_streams_ref, _check_reference)


def streams_backend(heads: int, head_dim: int, dtype: torch.dtype, device, dropout_p: float = 0.0,
                    mixed: bool = False) -> str:
    """Name of the backend `cross_attention_streams` would take for query rows attending to K/V
    of `heads` x `head_dim` in `dtype` on `device` (``mixed``: through a mixing plan). Lets a
    caller pick a schedule that suits the backend (the model forms leave_one_out K/V in the kernel
    only when the kernel runs)."""
    probe = torch.empty(1, heads, 1, head_dim, dtype=dtype, device=device)
    mix = MixPlan(torch.zeros(1, 1, dtype=torch.int32, device=device),
                  torch.ones(1, 1, 1, dtype=torch.float32, device=device)) if mixed else None
    return _streams.choose(probe.expand(2, -1, -1, -1), probe, probe, probe, probe, None, dropout_p, None,
                           mix=mix).name


def mixes_in_kernel(heads: int, head_dim: int, dtype: torch.dtype, device, dropout_p: float = 0.0) -> bool:
    """Whether `cross_attention_streams` forms the K/V of a mixing plan inside its kernel for K/V
    of `heads` x `head_dim` in `dtype` on `device` (lazy: never materialised). Where it does not,
    it would materialise them layer by layer (`mix_kv`); a caller that can merge the K/V of all
    layers at once, as the model does, should do that instead and pass plain K/V.

    Answered from the device type, dtype and sizes alone (no tensor is made, the dispatcher is not
    run), as the op's dispatch would choose for mixed streams of that kind: the forced backend
    (``SAM_FAST_BACKEND``) first, else the kernel wherever `_check_triton` would pass it (mixed
    streams never prefer SDPA). The model asks once per device and dtype, not per call."""
    forced = forced_backend()
    if forced and forced != "triton" and any(b.name == forced for b in _streams.backends):
        return False
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return _triton_config_reason(device_type, dtype, head_dim, dropout_p) is None


def mixed_kv_schedule(heads: int, head_dim: int, dtype: torch.dtype, device) -> str:
    """How a mixing plan's K/V are formed for these K/V on `device`, in words (``sam-fast env``)."""
    if mixes_in_kernel(heads, head_dim, dtype, device):
        return "formed inside the fused attention kernel (never materialised)"
    backend = streams_backend(heads, head_dim, dtype, device, mixed=True)
    return f"materialised once per batch by context_reweight (attention backend: {backend})"


def _validate_mix(mix, n2, key2):
    if not (isinstance(mix, (tuple, list)) and len(mix) == 2):
        raise ValueError("cross_attention_streams: mix must be (index [R2, M], weight [R2, M, Lk])")
    index, weight = mix
    R, _, Lk, _ = key2.shape
    if index.dim() != 2 or index.shape[0] != n2 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cross_attention_streams: mix index must be int32/int64 [{n2}, M] (one row per "
                         f"second-stream query row), got {index.dtype} {tuple(index.shape)}")
    if weight.shape != (*index.shape, Lk) or not weight.is_floating_point():
        raise ValueError(f"cross_attention_streams: mix weight must be floating [{n2}, {index.shape[1]}, {Lk}], "
                         f"got {weight.dtype} {tuple(weight.shape)}")


def cross_attention_streams(query, key, value, key2=None, value2=None, rows2=None, dropout_p=0.0, scale=None,
                            mix=None):
    """Cross-attention of the Q-stream and the W-stream query rows in one call (one launch on the
    Triton backend), no bias.

    query [N, H, Lq, d]: rows ``[0, S)`` with S = key.shape[0] attend to key/value [S, H, Lk, d]
    (row r to K/V row r; S may be 0); rows ``[S, N)`` attend to key2/value2 [R2, H, Lk, d], row
    S + j to K/V row ``rows2[j]`` (or j when rows2 is None; then R2 = N - S). K/V may be strided
    views.

    ``mix=MixPlan(index [N-S, M] int, weight [N-S, M, Lk] float)`` (or that plain pair) instead of rows2: row S + j attends to
    the K/V ``sum_s weight[j, s, :] * key2[index[j, s]]`` (same for value2), per key position;
    unused slots carry weight 0. The leave_one_out W-stream uses it with key2 = the images' K/V
    and the softmax weights of the other images of the sample: the Triton backend forms these
    K/V tiles on the fly (the merged maps are never materialised) and returns the gradient of
    `weight`; the reference backend materialises them (`mix_kv`).
    """
    split = key.shape[0]
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape or query.shape[1] != key.shape[1] \
            or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"cross_attention_streams: query {tuple(query.shape)} / key {tuple(key.shape)} / "
                         f"value {tuple(value.shape)} are not [N, H, L, d] with matching heads and head dim")
    if key2 is None:
        if split != query.shape[0]:
            raise ValueError(f"cross_attention_streams: {query.shape[0]} query rows but {split} K/V rows")
        if mix is not None or rows2 is not None:
            raise ValueError("cross_attention_streams: rows2/mix need key2/value2")
    else:
        n2 = query.shape[0] - split
        if key2.shape != value2.shape or key2.shape[1:] != key.shape[1:]:
            raise ValueError(f"cross_attention_streams: key2 {tuple(key2.shape)} / value2 {tuple(value2.shape)} "
                             f"do not match key {tuple(key.shape)} past the batch dimension")
        if mix is not None:
            if rows2 is not None:
                raise ValueError("cross_attention_streams: give rows2 or mix, not both")
            _validate_mix(mix, n2, key2)
            mix = MixPlan(*mix)
        else:
            want = n2 if rows2 is None else len(rows2)
            if (rows2 is None and key2.shape[0] != n2) or want != n2:
                raise ValueError(f"cross_attention_streams: {n2} second-stream query rows but "
                                 f"{key2.shape[0] if rows2 is None else len(rows2)} K/V rows (rows2)")
    return _streams(query, key, value, key2, value2, rows2, dropout_p, scale, mix=mix)


def cross_attention(query, key, value, attn_bias=None, dropout_p=0.0, scale=None):
    """Multi-head attention of `query` rows over `key`/`value` rows (shapes in module docstring)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"cross_attention: query/key/value must be [N, H, L, d], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape != value.shape or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"cross_attention: incompatible shapes query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    return _dispatch(query, key, value, attn_bias, dropout_p, scale)


def _forwarded(name: str) -> property:
    return property(lambda module: getattr(_common, name), lambda module, value: setattr(_common, name, value))


class _ProbeForwarding(types.ModuleType):
    """Deprecated names: the Triton probe's `_probe_triton`, `_triton_probe` and `_UNPROBED` moved
    to `sam_fast.ops._common`; reading or setting them on this module reads or sets them there, so
    code that resets or stubs the probe through this module keeps working."""

    _probe_triton = _forwarded("_probe_triton")
    _triton_probe = _forwarded("_triton_probe")
    _UNPROBED = _forwarded("_UNPROBED")


sys.modules[__name__].__class__ = _ProbeForwarding
