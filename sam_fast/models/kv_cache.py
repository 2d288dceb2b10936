"""A preallocated KV cache for beam search, used by HF's own LLaMA forward (a transformers `Cache`).

transformers' `DynamicCache` appends each step's keys with a copy of the whole cache
(``torch.cat``) and its beam reorder ``index_select``s the whole cache again: about two full
copies and allocations per decoding step. `BeamKVCache` holds every row (sample x beam) at its
final length, prompt plus new tokens, and writes each step's keys in place. Its beam reorder moves
only the generated positions: the beams of a sample share their prompt, so a reorder that maps
each row to a row of the same sample leaves the prompt positions as they are.

Two layouts. The double-buffered reorder moves the generated positions once, a gather through a
scratch buffer moves them twice (in and back): on a CPU, at the scaled config's shapes, the first
was the cheaper, and both far cheaper than DynamicCache's whole-cache reorder. The second buffer
costs memory (twice the cache), which the static layout does not spend:

- eager (``static=False``): two buffers per layer, both holding the prompt; a reorder gathers the
  generated positions of the live buffer into the other (``index_select(..., out=)``, no
  allocation) and the two swap. The forward sees views over the filled length only.
- static (``static=True``, for a compiled decoding step): one buffer per layer at a fixed address
  and the full length (the attention mask hides the unfilled positions, as HF's `StaticCache`);
  the position to write is a device tensor; a reorder goes through one scratch buffer shared by
  the layers and is copied back.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Cursor:
    """The write position shared by a cache's layers: `filled` positions hold keys (a host int, so
    eager slices need no read of the device); `position` the same as a device tensor (static)."""

    def __init__(self, filled: int, device):
        self.filled = filled
        self.position = torch.tensor([filled], dtype=torch.long, device=device)


class BeamKVLayer(CacheLayerMixin):
    """One layer's keys and values, [R, H, L, D] each, written in place at the cursor."""

    is_compileable = True
    is_sliding = False

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], cursor: _Cursor, static: bool,
                 scratch: torch.Tensor | None):
        super().__init__()
        self.buffers, self.cursor, self.static, self.scratch = buffers, cursor, static, scratch
        self.keys, self.values = buffers[0]
        self.max_cache_len = self.keys.shape[2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers were allocated at their final size."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new keys/values [R, H, q, D] at the cursor (the caller advances it after the
        forward); return the keys/values the attention reads: the full buffers (static) or views
        over the filled length (eager)."""
        if self.static:
            self.keys.index_copy_(2, self.cursor.position, key_states)
            self.values.index_copy_(2, self.cursor.position, value_states)
            return self.keys, self.values
        n, q = self.cursor.filled, key_states.shape[2]
        self.keys[:, :, n: n + q].copy_(key_states)
        self.values[:, :, n: n + q].copy_(value_states)
        return self.keys[:, :, : n + q], self.values[:, :, : n + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.max_cache_len if self.static else self.cursor.filled + query_length), 0

    def get_seq_length(self) -> int:
        return self.cursor.filled

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reorder_span(self, rows: torch.Tensor, start: int, end: int) -> None:
        """Row r takes the keys/values of row ``rows[r]`` at positions [start, end)."""
        if end <= start:
            return
        if self.static:
            tmp = self.scratch[:, :, : end - start]
            for buf in (self.keys, self.values):
                torch.index_select(buf[:, :, start:end], 0, rows, out=tmp)
                buf[:, :, start:end].copy_(tmp)
            return
        live = 0 if self.keys is self.buffers[0][0] else 1
        other = self.buffers[1 - live]
        for src, dst in zip(self.buffers[live], other):
            torch.index_select(src[:, :, start:end], 0, rows, out=dst[:, :, start:end])
        self.keys, self.values = other

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """HF's reorder: every filled position (rows may come from other samples)."""
        self.reorder_span(beam_idx, 0, self.cursor.filled)


class BeamKVCache(Cache):
    """Keys and values of `rows` = samples x beams rows over `max_len` positions, per layer.

    Build it with `from_prefill`; after each forward call `advance`; `reorder_generated(rows)`
    between steps. ``cache.filled`` is the number of positions written (a host int).
    """

    def __init__(self, layers: list[BeamKVLayer], cursor: _Cursor, prompt_len: int):
        super().__init__(layers=layers)
        self.cursor, self.prompt_len = cursor, prompt_len

    @classmethod
    def from_prefill(cls, prefill: Cache, repeats: int, max_len: int, *, static: bool = False) -> "BeamKVCache":
        """The prompt's keys/values of `prefill` ([B, H, S, D] per layer) given to `repeats`
        consecutive rows each ([B * repeats] rows), in buffers of `max_len` positions; double
        buffers when eager with several beams."""
        first = prefill.layers[0].keys
        B, H, S, _ = first.shape
        if max_len < S:
            raise ValueError(f"BeamKVCache: max_len={max_len} is shorter than the prompt ({S} positions)")
        cursor = _Cursor(S, first.device)
        copies = 2 if repeats > 1 and not static else 1
        scratch = None
        if static and repeats > 1:
            scratch = first.new_empty(B * repeats, H, max_len - S, first.shape[-1])
        layers = []
        for layer in prefill.layers:
            bufs = [tuple(_filled_buffer(t, repeats, max_len, zeroed=static) for t in (layer.keys, layer.values))
                    for _ in range(copies)]
            layers.append(BeamKVLayer(bufs, cursor, static, scratch))
        if static:  # CUDA graphs may then mutate them in place instead of copying them in each replay
            for t in [cursor.position] + [t for layer in layers for pair in layer.buffers for t in pair]:
                torch._dynamo.mark_static_address(t)
        return cls(layers, cursor, S)

    @property
    def filled(self) -> int:
        return self.cursor.filled

    @property
    def max_len(self) -> int:
        return self.layers[0].max_cache_len

    def advance(self, tokens: int = 1) -> None:
        """The forward wrote `tokens` positions at the cursor: move it on (host int and device)."""
        self.cursor.filled += tokens
        self.cursor.position.add_(tokens)

    def reorder_generated(self, rows: torch.Tensor) -> None:
        """Row r continues row ``rows[r]`` (a row of the same sample: the prompt is shared, so only
        the generated positions move)."""
        for layer in self.layers:
            layer.reorder_span(rows, self.prompt_len, self.cursor.filled)

    def nbytes(self) -> int:
        """Bytes of one copy of the keys and values (what a DynamicCache would hold at full length)."""
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers)


def _filled_buffer(prompt: torch.Tensor, repeats: int, max_len: int, zeroed: bool) -> torch.Tensor:
    """[B * repeats, H, max_len, D] with the prompt [B, H, S, D] in its first S positions of every
    repeat. The rest is zeroed when the attention reads it masked (static: uninitialised memory
    may hold NaN, and a masked NaN still poisons the softmax), else left uninitialised (eager reads
    only what was written)."""
    B, H, S, D = prompt.shape
    buf = prompt.new_zeros(B * repeats, H, max_len, D) if zeroed else prompt.new_empty(B * repeats, H, max_len, D)
    buf.view(B, repeats, H, max_len, D)[:, :, :, :S].copy_(prompt[:, None])
    return buf
