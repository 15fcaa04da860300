"""The latent cache of an MLA layer: preallocated buffers written in place, grown by chunks.

transformers' ``DynamicLayer`` appends with ``torch.cat``, copying the whole cache of the layer
at every decode step: O(L) per step, O(L²) per sequence. ``GrowingLayer`` keeps its keys and
values in buffers with room to spare and writes each new token in place; when the room runs out
it moves to buffers ``CHUNK`` tokens larger than needed, so a copy happens once per ``CHUNK``
steps. ``layer.keys`` / ``layer.values`` are views of the filled part, exactly as a
``DynamicLayer`` would hold them, so whatever measures or reorders a cache sees the same tensors.

An MLA layer caches (as its "keys" and "values"):

    c       (B, 1, L, r)   the latent
    k_rope  (B, 1, L, p)   the shared, rotated RoPE key

which the decode kernel reads row by row in place (batch stride = the buffer's capacity).

``use_growing_layer(cache, layer_idx)`` puts a ``GrowingLayer`` in the slot of an MLA layer of
any transformers cache that would otherwise give it a plain ``DynamicLayer`` (``generate``'s
default ``DynamicCache``, one made by hand), so the model decodes through it without being told.
A ``StaticCache`` (``generate(..., cache_implementation="static")``, for CUDA graphs) is already
preallocated and written in place: it stays, and ``static_seq_lens`` reads its fill level on the
device (no sync).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

CHUNK = 256  # tokens of room added whenever a buffer grows


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in preallocated buffers written in place."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        """A layer holding a copy of these (B, heads, L, d) keys and values (another layer's, say)."""
        layer = cls()
        layer.update(keys, values)
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.length = 0
        self._keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])  # (B, heads, capacity, dk)
        self._values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self._expose()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (B, heads, T, d) keys and values after the cached ones; return views of all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(end)
        self._keys[:, :, self.length : end].copy_(key_states)
        self._values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        """Move to buffers with room for `needed` tokens and CHUNK more (rounded to CHUNK)."""
        capacity = -(-(needed + CHUNK) // CHUNK) * CHUNK
        self._keys = _regrown(self._keys, self.length, capacity)
        self._values = _regrown(self._values, self.length, capacity)

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def _replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these (B, heads, L, d) tensors, in fresh buffers."""
        self._keys, self._values, self.length = keys[:, :, :0], values[:, :, :0], 0
        self._grow(keys.shape[-2])
        self._keys[:, :, : keys.shape[-2]].copy_(keys)
        self._values[:, :, : values.shape[-2]].copy_(values)
        self.length = keys.shape[-2]
        self._expose()

    # ---- the rest of the layer API, on the buffers ------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (a positive value: keep that many, as DynamicLayer)."""
        if not self.is_initialized:
            return
        keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
        self.length = max(0, min(self.length, keep))
        self._expose()

    def reset(self) -> None:
        if self.is_initialized:
            self.length = 0
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.device)
            self._replace(self.keys.index_select(0, idx), self.values.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._replace(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._replace(self.keys[indices, ...], self.values[indices, ...])

    def offload(self):
        if self.is_initialized:
            self._keys, self._values = (
                self._keys.to("cpu", non_blocking=True),
                self._values.to("cpu", non_blocking=True),
            )
            self._expose()

    def prefetch(self):
        if self.is_initialized and self._keys.device != self.device:
            self._keys = self._keys.to(self.device, non_blocking=True)
            self._values = self._values.to(self.device, non_blocking=True)
            self._expose()


def _regrown(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A (B, heads, capacity, d) buffer holding the first `length` tokens of `buffer`."""
    B, heads, _, d = buffer.shape
    grown = buffer.new_empty(B, heads, capacity, d)
    grown[:, :, :length].copy_(buffer[:, :, :length])
    return grown


def use_growing_layer(cache, layer_idx: int) -> None:
    """Give layer `layer_idx` of `cache` a GrowingLayer if it would otherwise get an empty plain DynamicLayer."""
    layers = cache.layers
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # DynamicCache() made without a config
        while len(layers) <= layer_idx:
            layers.append(DynamicLayer())
    if layer_idx < len(layers) and type(layers[layer_idx]) is DynamicLayer and not layers[layer_idx].is_initialized:
        layers[layer_idx] = GrowingLayer()


def static_seq_lens(cache, layer_idx: int, batch: int) -> torch.Tensor | None:
    """Tokens held by a StaticLayer, as an int32 (B,) device tensor (read without a sync); None for other layers."""
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    return layer.cumulative_length.to(torch.int32).reshape(1).repeat(batch)
