"""The frozen Q-former run as two streams in one batch (`WFormer`): the Q-stream (Part A) and
the W-stream (the W-former of Part B, the same layers a second time over merged contextual maps
I-hat), with the two injections at the interaction layers (l, k).

The parameters stay in HF's `InstructBlipQFormerModel` (so checkpoints load by key); the layers
run functionally here so that

- both streams share every layer's launches (their rows are one batch, except at layer k where
  the Q-stream needs c_i from the W-stream's output of that same layer);
- the cross-attention K/V of *all* cross-attention layers are projected once per image, in one
  GEMM ``[T*P, D] x [D, n_cross*2*H]`` (`project_cross_kv`); the W-stream's K/V are the Q-stream's
  re-weighted (`sam_fast.modules.guidance.AdaptiveAdjustment`), so I-hat is never projected;
- attention goes through `sam_fast.ops.cross_attention`, which picks its own backend.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sam_fast.ops import cross_attention, cross_attention_streams
from sam_fast.ops.cross_attention import mixes_in_kernel


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] 0/1 padding mask -> additive bias [N, 1, 1, L] (0 keep, dtype-min drop)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


# -- cross-attention K/V, projected once ------------------------------------------------------

def cross_layers(layers) -> list[nn.Module]:
    """The layers that have cross-attention, in order (BERT-base Q-former: 0, 2, ..., 10)."""
    return [layer for layer in layers if layer.has_cross_attention]


_KV_WEIGHT_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def cross_kv_weight(layers) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [n_cross*2*H, D], bias [n_cross*2*H])``: the key and value Linears of every
    cross-attention layer stacked as ``[k_0; v_0; k_1; v_1; ...]``.

    The stack is cached per module list while the (frozen) parameters keep their storage and
    version; when a parameter requires grad it is rebuilt in the graph every call, and so it is
    under torch.compile (the cache key compares data pointers, which dynamo cannot trace; in the
    compiled graph the stack is one concatenation of the weights).
    """
    def stack():
        return torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods])

    mods = [m for layer in cross_layers(layers) for m in (layer.crossattention.attention.key,
                                                           layer.crossattention.attention.value)]
    params = [p for m in mods for p in (m.weight, m.bias)]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return stack()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    hit = _KV_WEIGHT_CACHE.get(layers)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, *stack())
        _KV_WEIGHT_CACHE[layers] = hit
    return hit[1], hit[2]


@dataclass
class CrossKV:
    """K/V of every cross-attention layer for a set of rows: ``buffer`` [R, P, n_cross*2*H]
    laid out as ``[k_0 | v_0 | k_1 | v_1 | ...]`` on the last dimension, with H = ``hidden``
    (heads x head dim)."""

    buffer: torch.Tensor
    heads: int
    hidden: int

    def layer(self, c: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of cross layer c as [R, heads, P, d] strided views (no copy); ``rows`` [R']
        selects (and copies) rows of this layer only."""
        H = self.hidden
        k = self.buffer[..., 2 * c * H:(2 * c + 1) * H]
        v = self.buffer[..., (2 * c + 1) * H:(2 * c + 2) * H]
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        return _heads(k, self.heads), _heads(v, self.heads)


def project_cross_kv(layers, features: torch.Tensor) -> CrossKV:
    """K/V of all cross-attention layers for image features E [T, P, D] in one GEMM
    ``[T*P, D] x [D, n_cross*2*H]``."""
    weight, bias = cross_kv_weight(layers)
    T, P, D = features.shape
    buf = F.linear(features.reshape(T * P, D), weight, bias).view(T, P, -1)
    first = cross_layers(layers)[0].crossattention.attention
    return CrossKV(buf, first.num_attention_heads, first.all_head_size)


# -- one layer --------------------------------------------------------------------------------

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def self_attention_block(attn: nn.Module, hidden: torch.Tensor, bias, out_rows: int | None = None) -> torch.Tensor:
    """HF `InstructBlipQFormerAttention` (self): the first `out_rows` rows (all by default) of
    ``LN(hidden + dense(softmax(q k^T / sqrt(d) + bias) v))`` over all rows of `hidden` [N, L, H]."""
    mha = attn.attention
    hq = hidden if out_rows is None else hidden[:, :out_rows].contiguous()
    q = _heads(mha.query(hq), mha.num_attention_heads)
    k = _heads(mha.key(hidden), mha.num_attention_heads)
    v = _heads(mha.value(hidden), mha.num_attention_heads)
    p = mha.attention_dropout if mha.training else 0.0
    if bias is not None and bias.dtype != q.dtype:  # autocast: the projections run in half precision
        bias = bias.to(q.dtype)
    ctx = cross_attention(q, k, v, bias, dropout_p=p, scale=mha.scaling)
    return attn.output(ctx.transpose(1, 2).flatten(2), hq)


@dataclass(frozen=True)
class LayerKV:
    """What the query rows of one cross-attention layer attend to, as `cross_attention_streams`
    takes it: the first T query rows attend to `k`, `v` [T, heads, P, d] row by row (T may be 0,
    the Q-stream's K/V); the remaining rows as `second` says, the op's keyword arguments for its
    second stream (``key2``, ``value2`` and ``rows2`` or ``mix``), written by the W-stream's
    schedule (`WStream.layer_kv`). No `second`: every query row is a Q-stream row."""

    k: torch.Tensor
    v: torch.Tensor
    second: dict = field(default_factory=dict)


def cross_attention_block(attn: nn.Module, qrows: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """HF cross-attention of the query rows `qrows` [N, Q, H] to the precomputed K/V `kv` (both
    streams: see `LayerKV`). One query projection, one attention call (one kernel launch where the
    op fuses the streams) and one output projection serve both streams."""
    mha = attn.attention
    q = _heads(mha.query(qrows), mha.num_attention_heads)
    p = mha.attention_dropout if mha.training else 0.0
    ctx = cross_attention_streams(q, kv.k, kv.v, dropout_p=p, scale=mha.scaling, **kv.second)
    return attn.output(ctx.transpose(1, 2).flatten(2), qrows)


def qformer_layer(layer: nn.Module, hidden, self_bias, kv: LayerKV | None, query_length: int,
                  queries_only: bool = False):
    """One `InstructBlipQFormerLayer` on [N, Q + L_text, H] rows: self-attention over all rows,
    cross-attention of the Q query rows to precomputed K/V `kv` (layers that have it), then the
    query FFN on query rows and the text FFN on text rows. ``queries_only`` returns only the Q
    query rows (the text rows of the last layer are unused)."""
    att = self_attention_block(layer.attention, hidden, self_bias, query_length if queries_only else None)
    # Row slices are made contiguous: a Linear on a strided 3-D input falls back to bmm against an
    # expanded weight (measured 4x slower on CPU).
    qrows = att[:, :query_length].contiguous() if att.shape[1] > query_length else att
    if layer.has_cross_attention:
        qrows = cross_attention_block(layer.crossattention, qrows, kv)
    out = layer.output_query(layer.intermediate_query(qrows), qrows)
    if att.shape[1] > query_length:
        text = att[:, query_length:].contiguous()
        out = torch.cat([out, layer.output(layer.intermediate(text), text)], dim=1)
    return out


# -- both streams -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class WStream:
    """The W-stream rows of one batch (Part B) and what their cross-attention reads. This base is
    the plain schedule: one row per guided image from the start, row j reading row j of `kv`. The
    schedules of `sam_fast.modules.schedules` subclass it (shared mode's rows per sample before
    layer l, leave_one_out's K/V mixed in the attention kernel) by overriding the three methods.

    hidden, self_bias: [R0, Q+L, H], [R0, 1, 1, Q+L] the W-stream input to layer 1.
    kv: the K/V the W rows read (`CrossKV`; one row per merged map, or per image when mixed).
    target: [Tw] the Q-stream row (image i) that each W row guides from layer l on.
    """

    hidden: torch.Tensor
    self_bias: torch.Tensor
    kv: CrossKV
    target: torch.Tensor
    fans_out: ClassVar[bool] = False  # whether `fan_out` changes the rows (then the bias is rebuilt)

    def fan_out(self, hidden: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At layer l: the rows [R0, ...] and their bias as one row per guided image [Tw, ...]."""
        return hidden, bias

    def layer_kv(self, k: torch.Tensor, v: torch.Tensor, c: int, fanned: bool) -> LayerKV:
        """Cross layer c's K/V for both streams: the Q-stream's `k`, `v`, then the W rows' (per
        guided image when `fanned`, i.e. from layer l on)."""
        k2, v2 = self.kv.layer(c)
        return LayerKV(k, v, dict(key2=k2, value2=v2))

    def alone_kv(self, c: int) -> LayerKV:
        """Cross layer c's K/V for the W rows alone, one per guided image (layer k)."""
        return LayerKV(*self.kv.layer(c))

    def inject_out(self, guidance_out: nn.Module, x: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """After layer k: the Q-stream rows x [T, Q+L, H] with ``c_i = guidance_out(w)`` of every
        W row `w_out` [Tw, Q+L, H] added to its target row (`GuidanceOut.inject`)."""
        return guidance_out.inject(x, self.target, w_out)


class WFormer(nn.Module):
    """The frozen Q-former as two streams: the Q-stream (Part A, one row per image, cross-attending
    to its own features E_i) and the W-stream, the W-former of Part B (one row per guided image,
    cross-attending to I-hat). With the interaction layers (l, k), 1-based:

    - before layer l: ``w <- w + guidance_in(h_i)`` (`GuidanceIn`), h_i the Q-stream input to
      layer l (shared mode's rows deduplicated per sample fan out to one per image first);
    - after W-stream layer k: ``c_i = guidance_out(w)`` (`GuidanceOut`) is added to the Q-stream
      input to layer k before Q-stream layer k runs; the W-stream ends there.

    Layers before k run both streams in one batch. It holds references to the model's Q-former
    and injection modules, registered on the model (no parameter of its own, no state-dict key);
    (l, k) and the query length are read from the model config.
    """

    def __init__(self, qformer: nn.Module, guidance_in: nn.Module, guidance_out: nn.Module, config):
        super().__init__()
        self._parts = (qformer, guidance_in, guidance_out)  # a tuple: not registered twice
        self._config = config

    @property
    def layers(self) -> nn.ModuleList:
        """The Q-former layers (shared by both streams)."""
        return self._parts[0].encoder.layer

    @property
    def interaction_layers(self) -> tuple[int, int]:
        """(l, k), 1-based: where guidance enters the W-stream and where it leaves it."""
        l, k = self._config.interaction_layers
        return l, k

    @property
    def query_length(self) -> int:
        """Q, the query tokens per row."""
        return self._config.num_query_tokens

    def attention_kind(self) -> tuple[int, int, torch.device, torch.dtype, float]:
        """(heads, head dim, device, dtype, dropout) of the layers' cross-attention, the dropout
        while its module is in training mode (else 0): what the W-stream's schedule is chosen from
        (`sam_fast.modules.schedules.choose_w_schedule`). Reads attributes only."""
        att = cross_layers(self.layers)[0].crossattention.attention
        weight = att.key.weight
        dropout = att.attention_dropout if att.training else 0.0
        return att.num_attention_heads, att.attention_head_size, weight.device, weight.dtype, dropout

    def mixes_in_kernel(self, dtype: torch.dtype, device, training: bool = False) -> bool:
        """Whether the cross-attention op forms a mixing plan's K/V inside its kernel for these
        layers (then the leave_one_out W-stream's K/V stay lazy; else they are merged once)."""
        att = cross_layers(self.layers)[0].crossattention.attention
        p = att.attention_dropout if training else 0.0
        return mixes_in_kernel(att.num_attention_heads, att.attention_head_size, dtype, device, p)

    def project_kv(self, features: torch.Tensor) -> CrossKV:
        """K/V of every cross-attention layer for features E [T, P, D] (`project_cross_kv`)."""
        return project_cross_kv(self.layers, features)

    def forward(self, hidden: torch.Tensor, self_bias: torch.Tensor, kv: CrossKV,
                w_stream: WStream | None = None) -> torch.Tensor:
        """Q-stream rows `hidden` [T, Q+L, H] with `self_bias` [T, 1, 1, Q+L] and K/V `kv` (one
        row per image), W-stream `w_stream` (None: no guidance; its schedule decides its rows and
        K/V) -> the Q query rows of the Q-stream output [T, Q, H] (the last layer skips the text
        rows, which nothing reads)."""
        _, guidance_in, guidance_out = self._parts
        (l, k), Q, T = self.interaction_layers, self.query_length, hidden.shape[0]
        x, ws, c, last = hidden, w_stream, 0, len(self.layers)
        if ws is not None:
            w, w_bias = ws.hidden, ws.self_bias
            both_bias = torch.cat([self_bias, w_bias])
        for n, layer in enumerate(self.layers, start=1):
            if ws is not None and n == l:
                if ws.fans_out:
                    w, w_bias = ws.fan_out(w, w_bias)
                    both_bias = torch.cat([self_bias, w_bias])
                w = guidance_in.inject(w, x.index_select(0, ws.target))  # h_i
            q_kv = None
            if layer.has_cross_attention:
                q_kv, c = LayerKV(*kv.layer(c)), c + 1
            if ws is not None and n < k:  # both streams in one batch
                both = ws.layer_kv(q_kv.k, q_kv.v, c - 1, n >= l) if q_kv is not None else None
                out = qformer_layer(layer, torch.cat([x, w]), both_bias, both, Q)
                x, w = out[:T], out[T:]
                continue
            if ws is not None:  # n == k: the W-stream alone, then the Q-stream with c_i
                w_out = qformer_layer(layer, w, w_bias, ws.alone_kv(c - 1) if q_kv is not None else None, Q)
                x, ws = ws.inject_out(guidance_out, x, w_out), None
            x = qformer_layer(layer, x, self_bias, q_kv, Q, queries_only=n == last)
        return x[:, :Q]
