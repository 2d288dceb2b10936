"""The frozen Q-former run as two streams in one batch: the Q-stream (Part A) and the W-stream
(the W-former of Part B, the same layers a second time over merged contextual maps I-hat).

The parameters stay in HF's `InstructBlipQFormerModel` (so checkpoints load by key); this module
runs its layers functionally so that attention goes through `sam_fast.ops.cross_attention` and
both streams share every layer's launches.
"""

from __future__ import annotations

import torch
from torch import nn

from sam_fast.ops import cross_attention


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] 0/1 padding mask -> additive bias [N, 1, 1, L] (0 keep, dtype-min drop)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def attention_block(attn: nn.Module, hidden: torch.Tensor, kv_states: torch.Tensor, bias) -> torch.Tensor:
    """One HF `InstructBlipQFormerAttention` (self or cross): multi-head attention of `hidden`
    [N, Lq, H] over `kv_states` [N, Lk, Dkv], then dense + dropout + residual LayerNorm."""
    mha = attn.attention
    n, lq, _ = hidden.shape
    heads, d = mha.num_attention_heads, mha.attention_head_size
    q = mha.query(hidden).view(n, lq, heads, d).transpose(1, 2)
    k = mha.key(kv_states).view(n, -1, heads, d).transpose(1, 2)
    v = mha.value(kv_states).view(n, -1, heads, d).transpose(1, 2)
    p = mha.attention_dropout if mha.training else 0.0
    ctx = cross_attention(q, k, v, bias, dropout_p=p, scale=mha.scaling)
    ctx = ctx.transpose(1, 2).reshape(n, lq, heads * d)
    return attn.output(ctx, hidden)


def qformer_layer(layer: nn.Module, hidden, self_bias, image_states, query_length: int):
    """One `InstructBlipQFormerLayer` on [N, Q + L_text, H] rows: self-attention over all rows,
    cross-attention of the Q query rows to `image_states` [N, P, D] (layers that have it),
    then the query FFN on query rows and the text FFN on text rows."""
    att = attention_block(layer.attention, hidden, hidden, self_bias)
    qrows = att[:, :query_length]
    if layer.has_cross_attention:
        qrows = attention_block(layer.crossattention, qrows, image_states, None)
    out = layer.output_query(layer.intermediate_query(qrows), qrows)
    if att.shape[1] > query_length:
        text = att[:, query_length:]
        out = torch.cat([out, layer.output(layer.intermediate(text), text)], dim=1)
    return out


def run_two_streams(
    layers,
    hidden: torch.Tensor,
    self_bias: torch.Tensor,
    image_states: torch.Tensor,
    num_q_rows: int,
    ctx_index: torch.Tensor,
    guidance_in: nn.Module,
    guidance_out: nn.Module,
    interaction_layers: tuple[int, int],
    query_length: int,
) -> torch.Tensor:
    """Run the Q-stream and the W-stream through the Q-former layers with the two injections.

    Rows ``[0, num_q_rows)`` of `hidden`, `self_bias` and `image_states` are the Q-stream (one per
    image, cross-attending to its own features E_i); rows ``[num_q_rows, ...)`` are the W-stream
    (one per image that has contextual images, cross-attending to its merged map I-hat), and
    ``ctx_index[r]`` is the Q row that W row r guides. With (l, k) 1-based:

    - before layer l: ``w <- w + guidance_in(h_i)``, h_i the Q-stream input to layer l;
    - after W-stream layer k: ``c_i = guidance_out(w)``; the Q-stream input to layer k gets
      ``x <- x + c_i`` before Q-stream layer k runs; the W-stream ends there.

    Layers before k run both streams in one batch. Returns the Q-stream output [num_q_rows, Q+L, H].
    """
    l, k = interaction_layers
    has_w = hidden.shape[0] > num_q_rows
    T = num_q_rows
    for n, layer in enumerate(layers, start=1):
        if has_w and n == l:
            h_i = hidden[:T].index_select(0, ctx_index)
            hidden = torch.cat([hidden[:T], hidden[T:] + guidance_in(h_i)], dim=0)
        if has_w and n == k:
            w = qformer_layer(layer, hidden[T:], self_bias[T:], image_states[T:], query_length)
            c_i = guidance_out(w)
            x = hidden[:T].index_add(0, ctx_index, c_i)
            self_bias, image_states, has_w = self_bias[:T], image_states[:T], False
            hidden = qformer_layer(layer, x, self_bias, image_states, query_length)
        else:
            hidden = qformer_layer(layer, hidden, self_bias, image_states, query_length)
    return hidden[:T]
