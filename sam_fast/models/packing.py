"""Padding-free (packed) LLM step for the frozen LLaMA.

A training batch's LLM rows (visual tokens, ``</s>``, instruction, answer) differ a lot in length,
so about a quarter of a padded ``[B, S]`` batch is padding that every linear layer of the LLM still
pays for, forward and backward. This module removes it:

* `pack` keeps only the valid tokens of every row, concatenated into one row ``[1, N, H]``, with
  position ids restarting at 0 for every sample, ``cu_seqlens`` (the samples' boundaries) and the
  next-token targets shifted *within* each sample (a sample's first label is never predicted from
  the previous sample's last token).
* A varlen causal attention registered with transformers as ``"sam_fast_varlen"``: every sample
  attends only to its own earlier tokens. On CUDA it is one call per layer over the packed row
  ``[N, heads, d]``: torch's own ``torch.nn.attention.varlen.varlen_attn`` (flash attention, half
  precision), else flash-attn's varlen kernel where it imports, else one SDPA call with the
  block-diagonal causal mask. On CPU it is one causal SDPA call per sample (no ``[N, N]`` mask or
  score matrix), which was measured faster there than the one-call layouts (the reason string of
  `packing_backend`, which says which backend runs and why).
* `use_attention` switches the LLM to that attention for one call and restores it afterwards, so
  generation and the padded path are untouched.
* `planned_lm_loss` takes embeddings already packed by a pack plan (`sam_fast.data.PackPlan`,
  built by the collator on the host): the packed step then reads nothing back from the device.
* `packed_hidden_states` runs the LLaMA body (no ``lm_head``) on a packed batch, with its RMSNorm
  and SwiGLU on the fused ops for the call (`sam_fast.models.llama_kernels.fused_llama_kernels`:
  Triton on CUDA, a lean autograd backend that saves less elsewhere), and
  `packed_lm_loss` computes the mean next-token cross-entropy from those hidden states, with the
  ``lm_head`` applied only at supervised positions. Its ``loss_fn`` hook takes
  ``(hidden [M, H], weight [V, H], targets [M]) -> summed loss`` so a fused linear cross-entropy
  can replace the plain one.

The loss and the gradients equal the padded ``LlamaForCausalLM(..., labels=...)`` step's (same
positions, same mean over supervised tokens), up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sam_fast.models.llama_kernels import fused_llama_kernels

ATTENTION_NAME = "sam_fast_varlen"
IGNORE_INDEX = -100

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Packed:
    """A padded batch with its padding removed (see `pack`).

    inputs_embeds: ``[1, N, H]`` the valid tokens of all rows, row after row.
    position_ids: ``[1, N]`` positions restarting at 0 for every sample (the padded row's
        ``cumsum(attention_mask) - 1`` at its valid tokens).
    cu_seqlens: int32 ``[B + 1]`` cumulative sample lengths (sample ``b`` is ``cu[b]:cu[b+1]``).
    max_seqlen: length of the longest sample.
    seqlens: the ``B`` sample lengths as Python ints (so attention needs no device sync).
    indices: ``[N]`` flat indices of the valid tokens in the ``[B * S]`` padded layout.
    batch_shape: ``(B, S)`` of the padded batch, for `unpack`.
    labels: ``[1, N]`` the packed labels, or None.
    shift_labels: ``[1, N]`` the label of the next token of the same sample, ``-100`` at each
        sample's last token (the target predicted from each position), or None.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seqlens: tuple[int, ...]
    indices: torch.Tensor
    batch_shape: tuple[int, int]
    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.indices.numel())

    def attention_kwargs(self) -> dict:
        """The keyword arguments the varlen attention reads (transformers forwards a model's extra
        kwargs down to the attention function)."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "sam_fast_seqlens": self.seqlens,
        }


def pack(
    inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> Packed:
    """Remove the padding of a ``[B, S, H]`` batch: keep the tokens where ``attention_mask == 1``.

    Rows may be right- or left-padded, but each row's valid tokens must be contiguous. `labels`
    ``[B, S]`` (``-100`` = ignored) must be ``-100`` at padded positions. The returned
    ``shift_labels`` hold, for every packed token, the label of the next token of the same sample
    (``-100`` after each sample's last token), which is what HF's loss predicts from that position
    in the padded row. Raises ValueError naming the offending row on bad input.
    """
    valid, lengths, seqlens = _check_pack_inputs(inputs_embeds, attention_mask, labels)
    B, S, H = inputs_embeds.shape
    indices = valid.reshape(-1).nonzero().squeeze(1)
    embeds = inputs_embeds.reshape(B * S, H).index_select(0, indices).unsqueeze(0)
    positions = (valid.long().cumsum(dim=1) - 1).reshape(-1).index_select(0, indices).unsqueeze(0)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=inputs_embeds.device)
    cu[1:] = lengths.cumsum(0).to(torch.int32)
    packed = Packed(
        inputs_embeds=embeds,
        position_ids=positions,
        cu_seqlens=cu,
        max_seqlen=max(seqlens) if seqlens else 0,
        seqlens=seqlens,
        indices=indices,
        batch_shape=(B, S),
    )
    if labels is not None:
        packed.labels, packed.shift_labels = _shifted_labels(labels.to(inputs_embeds.device), indices, seqlens)
    return packed


def _check_pack_inputs(inputs_embeds, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """`pack`'s checks, with one host read for all rows: (valid [B, S] bool, lengths [B], the
    lengths on the host). Raises ValueError naming the offending row."""
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [B, S, H], got shape {tuple(inputs_embeds.shape)}")
    B, S, H = inputs_embeds.shape
    if attention_mask is None or tuple(attention_mask.shape) != (B, S):
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must be [B, S] = {(B, S)} like inputs_embeds, got {got}")
    if labels is not None and tuple(labels.shape) != (B, S):
        raise ValueError(f"labels must be [B, S] = {(B, S)} like inputs_embeds, got {tuple(labels.shape)}")
    mask = attention_mask.to(inputs_embeds.device)
    valid = mask if mask.dtype == torch.bool else mask != 0
    bad = torch.zeros(B, dtype=torch.long, device=valid.device) if mask.dtype == torch.bool else (
        (valid & (mask != 1)).any(dim=1).long()
    )

    lengths = valid.sum(dim=1)
    # contiguous rows: the span from the first to the last valid token holds only valid tokens
    idx = torch.arange(S, device=valid.device)
    first = torch.where(valid, idx, S).amin(dim=1)
    last = torch.where(valid, idx, -1).amax(dim=1)
    span = torch.where(lengths > 0, last - first + 1, 0)
    gap = span != lengths
    if labels is not None:
        stray = ((labels.to(valid.device) != IGNORE_INDEX) & ~valid).any(dim=1)
    host = torch.stack([lengths, gap.long(), bad] + ([stray.long()] if labels is not None else [])).tolist()
    if any(host[2]):
        raise ValueError(f"attention_mask row {host[2].index(1)} holds values other than 0 and 1")
    if any(host[1]):
        row = host[1].index(1)
        raise ValueError(
            f"attention_mask row {row} has a gap: packing needs each row's tokens contiguous (left or right padding)"
        )
    if labels is not None and any(host[3]):
        row = host[3].index(1)
        raise ValueError(f"labels row {row} has a label other than -100 at a padded position (attention_mask 0)")
    return valid, lengths, tuple(int(n) for n in host[0])


def _shifted_labels(labels: torch.Tensor, indices: torch.Tensor, seqlens: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, shift_labels) [1, total] of the packed tokens: each token's label of the next
    token of the same sample, -100 after each sample's last token."""
    flat = labels.reshape(-1).index_select(0, indices)
    shifted = torch.full_like(flat, IGNORE_INDEX)
    shifted[:-1] = flat[1:]
    ends = [e - 1 for e, n in zip(_cumsum(seqlens), seqlens) if n > 0]
    if ends:
        shifted[torch.tensor(ends, device=flat.device)] = IGNORE_INDEX
    return flat.unsqueeze(0), shifted.unsqueeze(0)


def _cumsum(seqlens: tuple[int, ...]) -> list[int]:
    out, total = [], 0
    for n in seqlens:
        total += n
        out.append(total)
    return out


def unpack(values: torch.Tensor, packed: Packed, fill: float = 0.0) -> torch.Tensor:
    """Scatter packed ``[1, N, ...]`` (or ``[N, ...]``) values back to the padded ``[B, S, ...]``
    layout of `packed`, with `fill` at padded positions (differentiable)."""
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == packed.num_tokens:
        values = values[0]
    if values.shape[0] != packed.num_tokens:
        raise ValueError(f"values hold {values.shape[0]} tokens, the packed batch {packed.num_tokens}")
    B, S = packed.batch_shape
    out = values.new_full((B * S, *values.shape[1:]), fill)
    out = out.index_copy(0, packed.indices, values)
    return out.reshape(B, S, *values.shape[1:])


# --------------------------------------------------------------------------------------------
# Varlen causal attention

_FLASH: dict = {}
_TORCH_VARLEN: dict = {}
_CUDA_KERNELS = ("varlen_attn", "flash_attn_varlen")
# The CPU choice, measured on one thread at the scaled config's proportions (forward + input
# gradient of one layer's attention; see the reason string)
_CPU_REASON = (
    "device is cpu: one causal SDPA per sample measured fastest (a block-diagonal masked SDPA "
    "computes every pair of samples' scores; jagged nested-tensor SDPA refuses is_causal; see "
    "docs/performance.md); torch's varlen_attn and flash-attn run on CUDA only"
)


def _flash_attn():
    """(flash_attn_varlen_func, version) or (None, why it could not be imported); cached."""
    if "result" not in _FLASH:
        try:
            mod = importlib.import_module("flash_attn")
            _FLASH["result"] = (mod.flash_attn_varlen_func, getattr(mod, "__version__", "?"))
        except Exception as exc:  # ImportError, or a build that does not match this torch
            _FLASH["result"] = (None, f"{type(exc).__name__}: {exc}")
    return _FLASH["result"]


def _torch_varlen():
    """(torch.nn.attention.varlen.varlen_attn, None) or (None, why this torch has none); cached."""
    if "result" not in _TORCH_VARLEN:
        try:
            _TORCH_VARLEN["result"] = (importlib.import_module("torch.nn.attention.varlen").varlen_attn, None)
        except Exception as exc:  # an older torch
            _TORCH_VARLEN["result"] = (None, f"{type(exc).__name__}: {exc}")
    return _TORCH_VARLEN["result"]


def _flash_shape_reason(dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why a flash-attention varlen kernel cannot take `dtype` / `head_dim`, or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (float16/bfloat16 only)"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"head dim {head_dim} (a multiple of 8 up to 256 only)"
    return None


def _torch_varlen_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why torch's varlen_attn (its flash-attention kernel) cannot run here, or None."""
    fn, why = _torch_varlen()
    if fn is None:
        return f"this torch has no torch.nn.attention.varlen ({why})"
    why = _flash_shape_reason(dtype, head_dim)
    if why:
        return why
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"compute capability {capability[0]}.{capability[1]} (flash attention needs 8.0 or newer)"
    return None


def _flash_attn_reason(dtype: torch.dtype, head_dim: int | None) -> tuple[str | None, str]:
    """(why flash-attn's varlen kernel cannot run, or None; its version)."""
    why = _flash_shape_reason(dtype, head_dim)
    if why:
        return why, ""
    fn, info = _flash_attn()
    if fn is None:
        return f"not installed or does not import ({info})", ""
    return None, info


def packing_backend(device, dtype: torch.dtype, head_dim: int | None = None) -> tuple[str, str]:
    """Which causal attention within samples a packed step runs on `device` / `dtype` with heads
    of `head_dim`, and why. One of:

    * ``"varlen_attn"``: torch's ``torch.nn.attention.varlen.varlen_attn`` (flash attention on
      CUDA, float16/bfloat16, head dim a multiple of 8 up to 256, compute capability >= 8.0);
    * ``"flash_attn_varlen"``: flash-attn's ``flash_attn_varlen_func`` (same limits, installed);
    * ``"sdpa_segment_mask"``: one SDPA call with the block-diagonal causal mask ``[N, N]``
      (other CUDA cases: one call per layer, shapes that depend on N only);
    * ``"sdpa_segments"``: one causal SDPA call per sample (CPU, where it was measured fastest).

    The first three are one call per layer over the whole packed row ``[N, heads, d]``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa_segments", _CPU_REASON.replace("device is cpu", f"device is {device.type}")
    torch_why = _torch_varlen_reason(device, dtype, head_dim)
    if torch_why is None:
        return "varlen_attn", f"torch.nn.attention.varlen.varlen_attn on CUDA, {dtype}"
    flash_why, version = _flash_attn_reason(dtype, head_dim)
    if flash_why is None:
        return "flash_attn_varlen", f"flash-attn {version} on CUDA, {dtype} (torch's varlen_attn: {torch_why})"
    return "sdpa_segment_mask", (f"one masked SDPA per layer over the block-diagonal causal layout (torch's "
                                 f"varlen_attn: {torch_why}; flash-attn: {flash_why})")


def _sdpa_segments(query, key, value, seqlens, scaling, dropout):
    """Causal attention of each sample on its own: q/k/v ``[1, heads, N, d]`` -> ``[1, N, heads, d]``."""
    gqa = query.shape[1] != key.shape[1]
    seqlens = [n for n in seqlens if n]
    # split, not slices: split's backward is one concatenation of the segments' gradients, where
    # each slice's backward would fill a zero tensor of the whole row and add into it
    outs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(seqlens, 2), key.split(seqlens, 2), value.split(seqlens, 2))
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)


def _sdpa_segment_mask(query, key, value, segments, scaling, dropout):
    """Causal attention within segments by one masked SDPA call: q/k/v ``[1, heads, N, d]``,
    `segments` [N] the segment of every token -> ``[1, N, heads, d]``. The mask [N, N] is built
    on the device from the segment ids, so nothing depends on the lengths on the host: the shapes
    are N's alone (what a compiled step needs; the per-sample calls of `_sdpa_segments` are one
    graph per list of lengths). Every token sees itself, so no row is empty."""
    n = query.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    mask = (segments[:, None] == segments[None, :]) & causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _varlen_kernel(name, query, key, value, cu, max_len, scaling, dropout):
    """One flash-attention varlen call over the packed row: q ``[1, Hq, N, d]``, k/v
    ``[1, Hkv, N, d]`` (Hq a multiple of Hkv), `cu` [B + 1] boundaries, `max_len` the longest
    sample (an upper bound such as N is valid) -> ``[1, N, Hq, d]``. The kernels take
    ``[N, heads, d]``, which the transposed views of the projections already are in memory."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu = cu.to(torch.int32)
    if name == "varlen_attn":
        fn, _ = _torch_varlen()
        out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),
                 enable_gqa=q.shape[1] != k.shape[1])
    else:
        fn, _ = _flash_attn()
        out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                 dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0)


def _check_packed_call(query, key, attention_mask, cu, segments, seqlens) -> None:
    """Refuse a call that is not one packed row (a mask, no boundaries, mismatching lengths)."""
    if cu is None and segments is None:
        raise RuntimeError(
            f"attention {ATTENTION_NAME!r} runs only on packed batches: call the model with "
            "Packed.attention_kwargs() (see sam_fast.models.packing.packed_hidden_states)"
        )
    if attention_mask is not None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} takes no attention mask (got {tuple(attention_mask.shape)})")
    n = sum(seqlens) if seqlens is not None else query.shape[2]
    if query.shape[0] != 1 or query.shape[2] != n or key.shape[2] != query.shape[2]:
        raise RuntimeError(
            f"attention {ATTENTION_NAME!r} expects one packed row of {n} tokens, "
            f"got query {tuple(query.shape)} key {tuple(key.shape)}"
        )


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function for a packed row: causal attention within each sample,
    by the backend of `packing_backend` (one call per layer, or per sample on CPU).

    q ``[1, Hq, N, d]``, k/v ``[1, Hkv, N, d]``. Reads the samples' boundaries from the kwargs
    transformers forwards from the model call: ``cu_seq_lens_q`` [B + 1] and ``max_length_q``,
    the host-side ``sam_fast_seqlens`` (see `Packed.attention_kwargs`) or, in the compiled step,
    ``sam_fast_segment_ids`` [N]; ``sam_fast_backend`` names the backend chosen by the caller
    (else it is chosen here). Returns ``([1, N, Hq, d], None)``.
    """
    cu, seqlens = kwargs.get("cu_seq_lens_q"), kwargs.get("sam_fast_seqlens")
    segments = kwargs.get("sam_fast_segment_ids")
    _check_packed_call(query, key, attention_mask, cu, segments, seqlens)
    name = kwargs.get("sam_fast_backend") or packing_backend(query.device, query.dtype, query.shape[-1])[0]
    if name == "varlen_attn" and dropout:
        name = "flash_attn_varlen" if _flash_attn()[0] is not None else "sdpa_segment_mask"  # it has no dropout
    if name in _CUDA_KERNELS and cu is not None:
        max_len = kwargs.get("max_length_q") or query.shape[2]
        return _varlen_kernel(name, query, key, value, cu, int(max_len), scaling, dropout), None
    if seqlens is not None and (name == "sdpa_segments" or cu is None):
        return _sdpa_segments(query, key, value, seqlens, scaling, dropout), None
    if segments is None:
        segments = segment_ids(cu, query.shape[2])
    return _sdpa_segment_mask(query, key, value, segments, scaling, dropout), None


_REGISTERED = False


def register_attention() -> str:
    """Register the varlen attention with transformers; idempotent. Returns its name.

    No mask function is registered for it: transformers then builds no mask for that attention
    (the boundaries travel as cu_seqlens), and skips its detection of packed rows from the
    position ids, which reads the device on every call."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
        _REGISTERED = True
    return ATTENTION_NAME


def _configs(model: torch.nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextlib.contextmanager
def use_attention(language_model: torch.nn.Module, name: str = ATTENTION_NAME) -> Iterator[None]:
    """Switch every config of `language_model` to attention implementation `name` inside the
    block, and restore each one's previous implementation on exit (also on error)."""
    if name == ATTENTION_NAME:
        register_attention()
    configs = _configs(language_model)
    if not configs:
        raise ValueError(f"{type(language_model).__name__} has no transformers config to switch attention on")
    saved = [cfg._attn_implementation for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation = name
        yield
    finally:
        for cfg, old in zip(configs, saved):
            cfg._attn_implementation = old


def _decoder(language_model: torch.nn.Module) -> torch.nn.Module:
    body = getattr(language_model, "model", None)
    if body is None and hasattr(language_model, "get_decoder"):
        body = language_model.get_decoder()
    if body is None:
        raise ValueError(f"{type(language_model).__name__} has no decoder body (.model) to run packed")
    return body


def packed_hidden_states(language_model: torch.nn.Module, packed: Packed) -> torch.Tensor:
    """Last hidden states ``[1, N, H]`` (after the final norm, before ``lm_head``) of the LLM's body
    on a packed batch, with varlen causal attention and per-sample positions."""
    body = _decoder(language_model)
    if getattr(body, "gradient_checkpointing", False) and body.training:
        raise ValueError(
            "packed LLM step: gradient checkpointing of the LLM is on; its recomputation would run "
            "outside the packed attention. Disable it or use the padded path"
        )
    if packed.num_tokens == 0:
        raise ValueError("packed LLM step: the batch has no valid token (attention_mask all 0)")
    backend = attention_backend(language_model, packed.inputs_embeds)
    with use_attention(language_model, ATTENTION_NAME), fused_llama_kernels(language_model):
        out = body(
            inputs_embeds=packed.inputs_embeds,
            position_ids=packed.position_ids,
            attention_mask=None,
            use_cache=False,
            sam_fast_backend=backend,
            **packed.attention_kwargs(),
        )
    return out.last_hidden_state


def attention_backend(language_model: torch.nn.Module, inputs_embeds: torch.Tensor) -> str:
    """The `packing_backend` name for `language_model`'s heads on `inputs_embeds`' device and
    dtype (chosen once per step, outside any compiled graph)."""
    cfg = getattr(language_model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    return packing_backend(inputs_embeds.device, inputs_embeds.dtype, head_dim)[0]


def plain_loss_fn(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [M, H] @ weight[V, H].T`` against `targets` ``[M]``, with the
    logits in float32 (as HF's causal-LM loss upcasts them)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def packed_lm_loss(
    language_model: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of a padded batch, computed without its padding.

    Equals ``language_model(inputs_embeds=..., attention_mask=..., labels=...).loss`` for a
    right-padded batch (and for a left-padded one called with ``position_ids = cumsum(mask) - 1``):
    targets are shifted within each sample and the mean runs over supervised positions. The
    ``lm_head`` is applied only at those positions; `loss_fn(hidden [M, H], weight [V, H],
    targets [M]) -> summed loss` replaces the plain logits + cross-entropy (e.g. a fused kernel).
    A sample's first label is never a target (nothing of the sample precedes it); HF's padded loss
    agrees for right padding, while for a left-padded row it would predict that label from the pad
    before it. `num_items_in_batch` (as in HF, for gradient accumulation) replaces the count of
    supervised positions as the divisor.
    """
    if labels is None:
        raise ValueError("packed_lm_loss needs labels [B, S] (-100 = ignored)")
    packed = pack(inputs_embeds, attention_mask, labels)
    head = _lm_head(language_model)
    targets = packed.shift_labels[0]
    sel = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    count = int(sel.numel())
    if count == 0:
        raise ValueError("labels have no supervised next-token position (all -100 after each sample's first token)")
    hidden = packed_hidden_states(language_model, packed)[0]
    total = (loss_fn or plain_loss_fn)(hidden.index_select(0, sel), head.weight, targets.index_select(0, sel))
    return total / (count if num_items_in_batch is None else num_items_in_batch)


def _lm_head(language_model: torch.nn.Module) -> torch.nn.Module:
    head = language_model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(language_model).__name__} has no output embedding (lm_head) for the loss")
    if getattr(head, "bias", None) is not None:
        raise ValueError("packed_lm_loss: an lm_head with a bias is not supported (LLaMA's has none)")
    return head


def planned(inputs_embeds: torch.Tensor, plan) -> Packed:
    """The `Packed` batch of embeddings ``[N, H]`` already in the packed order of `plan` (a
    `sam_fast.data.PackPlan`): every boundary and position comes from the plan, nothing is read
    from the device."""
    if inputs_embeds.dim() != 2 or inputs_embeds.shape[0] != plan.packed_length:
        raise ValueError(f"packed embeddings must be [N={plan.packed_length}, H] (the plan's tokens), "
                         f"got {tuple(inputs_embeds.shape)}")
    return Packed(
        inputs_embeds=inputs_embeds.unsqueeze(0),
        position_ids=plan.position_ids.unsqueeze(0),
        cu_seqlens=plan.cu_seqlens,
        max_seqlen=plan.max_seqlen,
        seqlens=tuple(plan.seqlens),
        indices=plan.index,
        batch_shape=tuple(plan.batch_shape),
    )


def planned_lm_loss(
    language_model: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    plan,
    loss_fn: LossFn | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`packed_lm_loss` of embeddings ``[N, H]`` already packed by `plan` (a
    `sam_fast.data.PackPlan`): the supervised rows and their shifted targets come from the plan,
    so the step reads nothing back from the device. `loss_fn` must accept targets that are all
    supervised (no -100)."""
    head = _lm_head(language_model)
    count = plan.num_targets
    if count == 0:
        raise ValueError("labels have no supervised next-token position (all -100 after each sample's first token)")
    hidden = packed_hidden_states(language_model, planned(inputs_embeds, plan))[0]
    rows, targets = plan.target_rows[:count], plan.targets[:count]  # a bucketed plan's filler targets are -100
    total = (loss_fn or plain_loss_fn)(hidden.index_select(0, rows), head.weight, targets)
    return total / (count if num_items_in_batch is None else num_items_in_batch)


def segment_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[length] long: the segment (sample) of every packed token, from the boundaries `cu_seqlens`
    [B + 1] on the device (no host read)."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)


def static_planned_loss_sum(language_model: torch.nn.Module, inputs_embeds: torch.Tensor,
                            position_ids: torch.Tensor, cu_seqlens: torch.Tensor, target_rows: torch.Tensor,
                            targets: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of a planned packed row, as a function of tensors only:
    what ``torch.compile(..., fullgraph=True)`` captures (`compiled_planned_loss`). Its shapes are
    the plan's (``[N]`` tokens, ``[M]`` targets), its attention one call per layer over the row
    (`backend`, a `packing_backend` name: a CUDA varlen kernel with the longest sample bounded by N,
    else a segment mask built on the device, `_sdpa_segment_mask`), its loss the plain one with
    ``ignore_index`` (so a bucketed plan's -100 filler targets add nothing) and the LLM's own
    modules (the compiler fuses them). Call it inside ``use_attention(language_model)``."""
    body = _decoder(language_model)
    n = inputs_embeds.shape[0]
    kernel = backend in _CUDA_KERNELS
    out = body(inputs_embeds=inputs_embeds.unsqueeze(0), position_ids=position_ids.unsqueeze(0), attention_mask=None,
               use_cache=False, sam_fast_segment_ids=None if kernel else segment_ids(cu_seqlens, n),
               cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=n, max_length_k=n,
               sam_fast_backend=backend if kernel else "sdpa_segment_mask")
    hidden = out.last_hidden_state[0].index_select(0, target_rows)
    logits = F.linear(hidden, _lm_head(language_model).weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def compiled_planned_loss(step: Callable, language_model: torch.nn.Module, inputs_embeds: torch.Tensor, plan,
                          num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """`planned_lm_loss` through `step`, a compiled `static_planned_loss_sum`: the mean over the
    plan's real targets (the divisor is applied outside the graph, so its value is no guard)."""
    if plan.num_targets == 0:
        raise ValueError("labels have no supervised next-token position (all -100 after each sample's first token)")
    if inputs_embeds.dim() != 2 or inputs_embeds.shape[0] != plan.packed_length:
        raise ValueError(f"packed embeddings must be [N={plan.packed_length}, H] (the plan's tokens), "
                         f"got {tuple(inputs_embeds.shape)}")
    if getattr(_decoder(language_model), "gradient_checkpointing", False) and language_model.training:
        raise ValueError("compiled packed step: gradient checkpointing of the LLM is on; disable it")
    with use_attention(language_model, ATTENTION_NAME):
        total = step(language_model, inputs_embeds, plan.position_ids, plan.cu_seqlens, plan.target_rows,
                     plan.targets, attention_backend(language_model, inputs_embeds))
    return total / (plan.num_targets if num_items_in_batch is None else num_items_in_batch)
