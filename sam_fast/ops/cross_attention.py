"""Q-former attention (self and cross) behind one op boundary.

Public op::

    cross_attention(query [N,H,Lq,d], key [N,H,Lk,d], value [N,H,Lk,d],
                    attn_bias [N,1,1|Lq,Lk] | None, dropout_p=0.0, scale=None) -> [N,H,Lq,d]

``softmax(q k^T * scale + attn_bias) v`` per row, with ``scale = d ** -0.5`` by default and
dropout on the probabilities in training (as HF's Q-former). In the Q-former the 32 query rows of
every image (and, in the W-stream, of every contextual row) attend to the 257 image tokens. The
reference body is `torch.nn.functional.scaled_dot_product_attention`; the fused Triton kernel of
the Q/W-former issue registers here as another backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sam_fast.ops.dispatch import dispatcher


def cross_attention_ref(query, key, value, attn_bias=None, dropout_p=0.0, scale=None):
    """Reference: SDPA (math or fused, PyTorch's choice), same formula as HF's eager path."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)


def _check_reference(*args, **kwargs):
    return None


def _sample():
    q = torch.randn(2, 2, 4, 8)
    k = torch.randn(2, 2, 6, 8)
    return (q, k, k.clone()), {}


_dispatch = dispatcher("cross_attention")
_dispatch.sample = _sample
_dispatch.register("reference", cross_attention_ref, _check_reference)


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
