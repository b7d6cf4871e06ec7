"""A KV cache that grows in place: ``DynamicCache`` semantics without a ``torch.cat`` per token.

transformers' ``DynamicLayer`` concatenates the whole cache with each new token, copying every layer's
keys and values once per decoded token (measured: ~20% of CPU decode time on the embedded model at
batch 1). This layer keeps a buffer with spare room (doubling when full), writes new states into it
and hands attention a view of the filled part. Imports transformers at module level: import it lazily.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_CAPACITY = 64  # tokens


class GrowingLayer(DynamicLayer):
    """One layer's cache: buffers ``[batch, heads, capacity, head_dim]``, the first ``n`` positions filled."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self._k is None or self._n + q > self._k.shape[-2]:
            self._grow(key_states, value_states, self._n + q)
        self._k[..., self._n : self._n + q, :] = key_states
        self._v[..., self._n : self._n + q, :] = value_states
        self._n += q
        self._refresh()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        cap = max(_MIN_CAPACITY, 2 * need)
        b, h, _, dk = key_states.shape
        new_k = key_states.new_empty((b, h, cap, dk))
        new_v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
        if self._k is not None and self._n:
            new_k[..., : self._n, :] = self._k[..., : self._n, :]
            new_v[..., : self._n, :] = self._v[..., : self._n, :]
        self._k, self._v = new_k, new_v

    def _refresh(self) -> None:
        self.keys = self._k[..., : self._n, :]
        self.values = self._v[..., : self._n, :]

    def get_seq_length(self) -> int:
        return self._n

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        if tokens_to_remove and self._n:
            self._n = max(0, self._n + tokens_to_remove)
            self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._n:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._n:
            self._k = self._k[indices, ...]
            self._v = self._v[indices, ...]
            self._refresh()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place; other layer kinds
    (sliding window, linear attention) keep transformers' own implementation."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
