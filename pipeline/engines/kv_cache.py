"""KV caches of the transformers policy: a cache that grows in place, batch joins, and a bounded prefix store.

* ``GrowingLayer``: ``DynamicCache`` semantics without a ``torch.cat`` per token. transformers'
  ``DynamicLayer`` concatenates the whole cache with each new token, copying every layer's keys and values
  once per decoded token (measured: ~20% of CPU decode time on the embedded model at batch 1). This layer
  keeps a buffer with spare room (doubling when full), writes new states into it and hands attention a
  view of the filled part.
* ``join_left_padded``: two running batches in one (continuous batching admits new rows this way).
* ``compact_rows``: drop finished rows in place, moving only the rows that fill their slots (not a copy of the
  whole cache per retirement: that was ~9% of an evaluation's engine time).
* ``PrefixStore``: the KV of prompts already prefilled (the instruction prefix, and every tree node's
  question + history), so a child's prompt prefills only what its parent's lacks. Bounded in bytes,
  least recently used entries evicted first, pinned entries never.

Imports transformers at module level: import it lazily.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_CAPACITY = 64  # tokens


@functools.cache
def _cache_arg_name(model_class: type) -> str:
    forward = getattr(model_class, "forward", None) or model_class.__call__
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model``'s forward: transformers renamed ``past_key_values`` to ``cache`` (the old name
    warns from 5.24 and goes in 5.40); older releases know only the old one."""
    inner = getattr(model, "module", model)
    return {_cache_arg_name(type(inner)): cache}


class GrowingLayer(DynamicLayer):
    """One layer's cache: buffers ``[slots, heads, capacity, head_dim]``, the first ``b`` slots in use (rows) and
    their first ``n`` positions filled."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        self._b = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self._k is None or self._n + q > self._k.shape[-2]:
            self._grow(key_states, value_states, self._n + q)
        self._k[: self._b, :, self._n : self._n + q] = key_states
        self._v[: self._b, :, self._n : self._n + q] = value_states
        self._n += q
        self._refresh()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        cap = max(_MIN_CAPACITY, 2 * need)
        b, h, _, dk = key_states.shape
        new_k = key_states.new_empty((b, h, cap, dk))
        new_v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
        if self._k is not None and self._n:
            new_k[:, :, : self._n] = self._k[:b, :, : self._n]
            new_v[:, :, : self._n] = self._v[:b, :, : self._n]
        self._k, self._v, self._b = new_k, new_v, b

    def _refresh(self) -> None:
        self.keys = self._k[: self._b, :, : self._n]
        self.values = self._v[: self._b, :, : self._n]

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
            self._k = self._k[: self._b].repeat_interleave(repeats, dim=0)
            self._v = self._v[: self._b].repeat_interleave(repeats, dim=0)
            self._b = self._k.shape[0]
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._n:
            self._k = self._k[: self._b][indices, ...]
            self._v = self._v[: self._b][indices, ...]
            self._b = self._k.shape[0]
            self._refresh()

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, rows: int) -> None:
        """Copy slots ``src`` into slots ``dst`` (filled positions only), then use the first ``rows`` slots."""
        if self._n and len(dst):
            self._k[dst, :, : self._n] = self._k[src, :, : self._n]
            self._v[dst, :, : self._n] = self._v[src, :, : self._n]
        self._b = rows
        if self._k is not None:
            self._refresh()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = self._b = 0
        super().reset()

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        """Take ``keys``/``values`` (``[batch, heads, capacity, head_dim]``, first ``n`` positions filled) as
        this layer's buffers, without a copy."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._k, self._v, self._n, self._b = keys, values, n, keys.shape[0]
        self._refresh()


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place; other layer kinds
    (sliding window, linear attention) keep transformers' own implementation."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _growing_layers(cache: DynamicCache) -> list[GrowingLayer]:
    if not all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise TypeError(f"continuous batching joins full-attention caches only; this model's cache has {kinds}: "
                        f"set engines.continuous_batching: false for it")
    return cache.layers  # type: ignore[return-value]


def cache_of(config, kvs: Sequence[tuple[torch.Tensor, torch.Tensor]], spare: int = _MIN_CAPACITY) -> DynamicCache:
    """A growing cache holding ``kvs`` (one ``(keys, values)`` per layer, ``[batch, heads, seq, head_dim]``)."""
    cache = growing_cache(config)
    for layer, (k, v) in zip(_growing_layers(cache), kvs, strict=True):
        b, h, n, d = k.shape
        bk, bv = k.new_empty((b, h, n + spare, d)), v.new_empty((b, h, n + spare, v.shape[-1]))
        bk[..., :n, :], bv[..., :n, :] = k, v
        layer.adopt(bk, bv, n)
    return cache


def compact_rows(cache: DynamicCache, keep: Sequence[int]) -> list[int]:
    """Keep only rows ``keep`` (ascending positions) of ``cache``, in place: each kept row past the new end moves
    into a dropped row's slot, the others stay. Returns ``order``: row i afterwards was row ``order[i]`` before
    (apply it to everything indexed by row). A row's keys and values are the same bits wherever it sits."""
    rows = len(keep)
    kept = set(keep)
    holes = [i for i in range(rows) if i not in kept]
    movers = [i for i in keep if i >= rows]
    order = list(range(rows))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    layers = _growing_layers(cache)
    device = layers[0].keys.device if layers and layers[0].is_initialized else None
    dst = torch.tensor(holes, dtype=torch.long, device=device)
    src = torch.tensor(movers, dtype=torch.long, device=device)
    for layer in layers:
        layer.move_rows(dst, src, rows)
    return order


def _first_used(mask: torch.Tensor) -> int:
    used = mask.any(0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]


def join_left_padded(config, a: DynamicCache | None, mask_a: torch.Tensor | None, b: DynamicCache,
                     mask_b: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of ``a`` then rows of ``b`` in one cache. Both are left padded (``mask`` 0 = padding, shape
    ``[rows, seq]``): the narrower is padded further on the left, and columns that are padding in every row
    of a side are dropped first, so the width is the longest row's, not the sum of past paddings."""
    if a is None or mask_a is None:
        return b, mask_b
    ta, tb = _first_used(mask_a), _first_used(mask_b)
    wa, wb = mask_a.shape[1] - ta, mask_b.shape[1] - tb
    w = max(wa, wb)
    ra, rb = mask_a.shape[0], mask_b.shape[0]
    mask = mask_a.new_zeros((ra + rb, w))
    mask[:ra, w - wa :] = mask_a[:, ta:]
    mask[ra:, w - wb :] = mask_b[:, tb:]
    kvs = []
    for la, lb in zip(_growing_layers(a), _growing_layers(b), strict=True):
        pair = []
        for xa, xb in ((la.keys, lb.keys), (la.values, lb.values)):
            out = xa.new_zeros((ra + rb, xa.shape[1], w, xa.shape[-1]))
            out[:ra, :, w - wa :] = xa[:, :, ta:]
            out[ra:, :, w - wb :] = xb[:, :, tb:]
            pair.append(out)
        kvs.append((pair[0], pair[1]))
    return cache_of(config, kvs), mask


def row_kv(cache: DynamicCache, row: int, cols: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s keys/values at sequence columns ``cols``, as ``[1, heads, len(cols), head_dim]`` copies."""
    return [(layer.keys[row : row + 1, :, cols].clone(), layer.values[row : row + 1, :, cols].clone())
            for layer in _growing_layers(cache)]


class PrefixStore:
    """KV of token prefixes, looked up by longest match. At most ``max_bytes`` of tensors (pinned entries
    count too); adding beyond it evicts the least recently used unpinned entries; an entry larger than what
    eviction can free is not stored. Not thread safe: the caller serialises (the running batch's lock)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: must be >= 0 (0 stores nothing)")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[list, int, bool]] = OrderedDict()  # kv, bytes, pinned
        self._lengths: dict[int, int] = {}  # prefix length -> entries of that length
        self.hits = self.lookups = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, ids: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]], pinned: bool = False) -> bool:
        """Stores ``kv`` (per layer, batch 1, ``len(ids)`` positions) for ``ids``; False when it cannot fit."""
        key = tuple(ids)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        pinned_bytes = sum(b for _, b, p in self._entries.values() if p)
        if pinned_bytes + size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            victim = next(k for k, (_, _, p) in self._entries.items() if not p)
            self._drop(victim)
            self.evictions += 1
        self._entries[key] = (kv, size, pinned)
        self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
        self.bytes += size
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        _, size, _ = self._entries.pop(key)
        self.bytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]

    def longest(self, ids: Sequence[int], limit: int) -> tuple[int, list | None]:
        """(length, kv) of the longest stored prefix of ``ids`` no longer than ``limit``; (0, None) if none."""
        self.lookups += 1
        for n in sorted((n for n in self._lengths if n <= limit), reverse=True):
            key = tuple(ids[:n])
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return n, self._entries[key][0]
        return 0, None
