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
from dataclasses import dataclass

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


@dataclass
class LayerKV:
    """What the query rows of one cross-attention layer attend to (`cross_attention_streams`).

    k, v: [T, heads, P, d] the Q-stream's K/V, one row per image, read row by row by the first T
        query rows (T may be 0).
    k2, v2: [R2, heads, P, d] or None: the W-stream's K/V, read by the remaining query rows:
        rows ``rows2`` [Tw] (None: row by row), or, with ``mix`` ``(index [Tw, M], weight
        [Tw, M, P])``, the K/V mixed from them inside the attention kernel.
    """

    k: torch.Tensor
    v: torch.Tensor
    k2: torch.Tensor | None = None
    v2: torch.Tensor | None = None
    rows2: torch.Tensor | None = None
    mix: tuple[torch.Tensor, torch.Tensor] | None = None


def cross_attention_block(attn: nn.Module, qrows: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """HF cross-attention of the query rows `qrows` [N, Q, H] to the precomputed K/V `kv` (both
    streams: see `LayerKV`). One query projection, one attention call (one kernel launch where the
    op fuses the streams) and one output projection serve both streams."""
    mha = attn.attention
    q = _heads(mha.query(qrows), mha.num_attention_heads)
    p = mha.attention_dropout if mha.training else 0.0
    ctx = cross_attention_streams(q, kv.k, kv.v, kv.k2, kv.v2, kv.rows2, dropout_p=p, scale=mha.scaling, mix=kv.mix)
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


def _w_alone(w_kv: LayerKV) -> LayerKV:
    """The K/V of the W-stream rows alone (layer k; `w_kv` holds them as its second stream):
    gathered rows, row by row, or the mixing plan after an empty first stream."""
    k, v, rows = w_kv.k2, w_kv.v2, w_kv.rows2
    if w_kv.mix is not None:
        return LayerKV(k[:0], v[:0], k, v, rows, w_kv.mix)
    if rows is not None:
        return LayerKV(k.index_select(0, rows), v.index_select(0, rows))
    return LayerKV(k, v)


# -- both streams -----------------------------------------------------------------------------

@dataclass
class WStream:
    """The W-stream rows (Part B) and how they map to images.

    hidden, self_bias: [R0, Q+L, H], [R0, 1, 1, Q+L] the W-stream input to layer 1.
    kv: K/V of the merged maps I-hat (`CrossKV`, one row per map).
    target: [Tw] the Q-stream row (image i) that each per-image W row guides.
    expand: [Tw] or None. With dedup (shared mode) the rows before layer l are one per sample;
        at layer l row j of the per-image W-stream is ``w[expand[j]]``. None: rows are per image
        from the start.
    kv_rows: [Tw] or None: the K/V row of each per-image W row (None: row j uses K/V row j).
        Rows before layer l use K/V row r (dedup rows and K/V rows are both per sample).
    mix: (index [Tw, M], weight [Tw, M, P]) or None. With a mixing plan (leave_one_out on the
        fused kernel) `kv` is the images' K/V and W row j attends to ``sum_s weight[j, s] *
        kv[index[j, s]]``, formed inside the attention kernel (`sam_fast.ops.cross_attention_streams`).
    """

    hidden: torch.Tensor
    self_bias: torch.Tensor
    kv: CrossKV
    target: torch.Tensor
    expand: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    mix: tuple[torch.Tensor, torch.Tensor] | None = None


class _WRows:
    """The W-stream's rows while it runs (a `WStream` is an input and is never mutated: a
    recomputing backward runs the streams again from it)."""

    def __init__(self, ws: WStream, q_bias: torch.Tensor):
        self.ws, self.q_bias = ws, q_bias
        self.hidden, self.bias, self.kv_rows = ws.hidden, ws.self_bias, None
        self.both_bias = torch.cat([q_bias, self.bias])

    def fan_out(self) -> None:
        """At layer l: one row per guided image from here on (shared mode's dedup rows expand)."""
        if self.ws.expand is not None:
            self.hidden = self.hidden.index_select(0, self.ws.expand)
            self.bias = self.bias.index_select(0, self.ws.expand)
            self.both_bias = torch.cat([self.q_bias, self.bias])
        self.kv_rows = self.ws.kv_rows

    def kv(self, q_kv: tuple[torch.Tensor, torch.Tensor], c: int) -> LayerKV:
        """Cross layer c's K/V: the Q-stream's `q_kv` then this W-stream's."""
        return LayerKV(*q_kv, *self.ws.kv.layer(c), self.kv_rows, self.ws.mix)


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
        row per image), W-stream `w_stream` (None: no guidance) -> the Q query rows of the
        Q-stream output [T, Q, H] (the last layer skips the text rows, which nothing reads)."""
        _, guidance_in, guidance_out = self._parts
        (l, k), Q, T = self.interaction_layers, self.query_length, hidden.shape[0]
        x, w = hidden, None if w_stream is None else _WRows(w_stream, self_bias)
        c, last = 0, len(self.layers)
        for n, layer in enumerate(self.layers, start=1):
            if w is not None and n == l:
                w.fan_out()
                w.hidden = guidance_in.inject(w.hidden, x.index_select(0, w.ws.target))  # h_i
            q_kv = both = None
            if layer.has_cross_attention:
                q_kv = LayerKV(*kv.layer(c))
                both = w.kv((q_kv.k, q_kv.v), c) if w is not None else None
                c += 1
            if w is not None and n < k:  # both streams in one batch
                out = qformer_layer(layer, torch.cat([x, w.hidden]), w.both_bias, both, Q)
                x, w.hidden = out[:T], out[T:]
                continue
            if w is not None:  # n == k: the W-stream alone, then the Q-stream with c_i
                w_out = qformer_layer(layer, w.hidden, w.bias, _w_alone(both) if both else None, Q)
                x, w = guidance_out.inject(x, w.ws.target, w_out), None
            x = qformer_layer(layer, x, self_bias, q_kv, Q, queries_only=n == last)
        return x[:, :Q]
