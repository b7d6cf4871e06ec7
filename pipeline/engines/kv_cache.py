"""KV caches of the transformers policy: a cache that grows in place, batch joins, and a bounded prefix store.

* ``GrowingLayer``: ``DynamicCache`` semantics without a ``torch.cat`` per token. transformers'
  ``DynamicLayer`` concatenates the whole cache with each new token, copying every layer's keys and values
  once per decoded token (measured: ~20% of CPU decode time on the embedded model at batch 1). This layer
  keeps a buffer with spare room (doubling when full), writes new states into it and hands attention a
  view of the filled part.
* ``join_left_padded``: two running batches in one (continuous batching admits new rows this way), in place
  when the running batch has free row slots and headroom columns: a join then costs its new rows only.
* ``compact_rows``: drop finished rows in place, moving only the rows that fill their slots (not a copy of the
  whole cache per retirement: that was ~9% of an evaluation's engine time).
* ``PrefixStore``: the KV of prompts already prefilled (the instruction prefix, and every tree node's
  question + history), so a child's prompt prefills only what its parent's lacks; and, kept with a prompt's
  entry, the KV its samples computed while decoding (``extend``), so the child's prompt does not prefill again
  the step its parent generated. Bounded in bytes, least recently used entries evicted first (with their
  samples' KV), pinned entries never.

Imports transformers at module level: import it lazily.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from pipeline.engines.cascade import GroupPrefix

_MIN_CAPACITY = 64  # tokens
JOIN_HEADROOM = 64  # columns kept free on the left of a running batch, so joins that widen it copy no rows


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
    columns ``[s, n)`` filled. Columns left of ``s`` are headroom (never read; ``widen`` zeroes what it takes): a
    join that needs a wider batch moves ``s`` left instead of copying every row (``join_left_padded``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._s = 0
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
        """Room for columns up to ``need`` (absolute): a new buffer with the filled columns moved to the left,
        keeping at most ``JOIN_HEADROOM`` columns of headroom (trimmed columns do not pile up over a long run)."""
        b, h, _, dk = key_states.shape
        head = min(self._s, JOIN_HEADROOM)
        width = self._n - self._s
        cap = max(_MIN_CAPACITY, 2 * (need - self._s + head))
        slots = max(b, self._k.shape[0]) if self._k is not None else b
        # Unwritten columns are never read: columns from n on are written before they enter the view, and
        # ``widen`` zeroes headroom columns as it hands them to the rows.
        new_k = key_states.new_empty((slots, h, cap, dk))
        new_v = value_states.new_empty((slots, h, cap, value_states.shape[-1]))
        if self._k is not None and width:
            new_k[:b, :, head : head + width] = self._k[:b, :, self._s : self._n]
            new_v[:b, :, head : head + width] = self._v[:b, :, self._s : self._n]
        self._k, self._v, self._b = new_k, new_v, b
        self._s, self._n = head, head + width

    def _refresh(self) -> None:
        self.keys = self._k[: self._b, :, self._s : self._n]
        self.values = self._v[: self._b, :, self._s : self._n]

    @property
    def slots(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

    @property
    def headroom(self) -> int:
        return self._s

    def get_seq_length(self) -> int:
        return self._n - self._s

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        if tokens_to_remove and self._n > self._s:
            self._n = max(self._s, self._n + tokens_to_remove)
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
        if self._n > self._s and len(dst):
            self._k[dst, :, self._s : self._n] = self._k[src, :, self._s : self._n]
            self._v[dst, :, self._s : self._n] = self._v[src, :, self._s : self._n]
        self._b = rows
        if self._k is not None:
            self._refresh()

    def trim(self, columns: int) -> None:
        """Drop the first ``columns`` filled columns (padding in every row) from the view; no copy."""
        self._s = min(self._s + columns, self._n)
        self._refresh()

    def widen(self, columns: int) -> None:
        """``columns`` more columns on the left of every row, zeros, taken from the headroom; no copy of the rows."""
        if columns > self._s:
            raise ValueError(f"widen({columns}): only {self._s} columns of headroom")
        if columns:
            self._k[: self._b, :, self._s - columns : self._s] = 0
            self._v[: self._b, :, self._s - columns : self._s] = 0
            self._s -= columns
            self._refresh()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows ``keys``/``values`` (``[r, heads, w, head_dim]``, ``w`` <= the filled width) into the next free
        slots, right aligned (zeros on their left); ``r`` must fit in the free slots."""
        r, w = keys.shape[0], keys.shape[-2]
        b, width = self._b, self._n - self._s
        if b + r > self.slots or w > width:
            raise ValueError(f"append_rows: {r} rows of {w} columns do not fit {self.slots - b} free slots of "
                             f"{width} columns")
        for buf, x in ((self._k, keys), (self._v, values)):
            buf[b : b + r, :, self._s : self._n - w] = 0
            buf[b : b + r, :, self._n - w : self._n] = x
        self._b = b + r
        self._refresh()

    def reset(self) -> None:
        self._k = self._v = None
        self._s = self._n = self._b = 0
        super().reset()

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, n: int, start: int = 0, rows: int | None = None) -> None:
        """Take ``keys``/``values`` (``[slots, heads, capacity, head_dim]``, columns ``[start, n)`` filled, the
        first ``rows`` slots in use, all by default) as this layer's buffers, without a copy."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._k, self._v, self._s, self._n = keys, values, start, n
        self._b = keys.shape[0] if rows is None else rows
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
                     mask_b: torch.Tensor, slots: int = 0) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of ``a`` then rows of ``b`` in one cache. Both are left padded (``mask`` 0 = padding, shape
    ``[rows, seq]``): the narrower is padded further on the left, and columns that are padding in every row
    of a side are dropped first, so the width is the longest row's, not the sum of past paddings.

    In place when it can (returns ``a``): ``b``'s rows go into free slots of ``a``'s buffers and a wider ``b`` takes
    columns from ``a``'s headroom, so a join costs the new rows, not a copy of the whole running batch (measured
    2026-12-02: that copy was 7-11% of the engine's time in a full rollout phase). Otherwise both are copied into
    new buffers with ``slots`` row slots (at least the rows) and ``JOIN_HEADROOM`` columns of headroom."""
    if a is None or mask_a is None:
        return b, mask_b
    ta, tb = _first_used(mask_a), _first_used(mask_b)
    wa, wb = mask_a.shape[1] - ta, mask_b.shape[1] - tb
    w = max(wa, wb)
    ra, rb = mask_a.shape[0], mask_b.shape[0]
    mask = mask_a.new_zeros((ra + rb, w))
    mask[:ra, w - wa :] = mask_a[:, ta:]
    mask[ra:, w - wb :] = mask_b[:, tb:]
    layers_a, layers_b = _growing_layers(a), _growing_layers(b)
    if all(la.slots >= ra + rb and la.headroom + ta >= w - wa for la in layers_a):
        for la, lb in zip(layers_a, layers_b, strict=True):
            la.trim(ta)
            la.widen(w - wa)
            la.append_rows(lb.keys[:, :, tb:], lb.values[:, :, tb:])
        return a, mask
    cache = growing_cache(config)
    n_slots, start = max(slots, ra + rb), JOIN_HEADROOM
    for la, lb, layer in zip(layers_a, layers_b, _growing_layers(cache), strict=True):
        pair = []
        for xa, xb in ((la.keys, lb.keys), (la.values, lb.values)):
            # Empty, not zeros: only the rows' padding is read (zeroed here); headroom, free slots and columns
            # past the rows are written before they are read (``GrowingLayer``), so zeroing them all, max_rows
            # slots wide, would be wasted work on every copying join.
            out = xa.new_empty((n_slots, xa.shape[1], start + w + _MIN_CAPACITY, xa.shape[-1]))
            out[:ra, :, start : start + w - wa] = 0
            out[:ra, :, start + w - wa : start + w] = xa[:, :, ta:]
            out[ra : ra + rb, :, start : start + w - wb] = 0
            out[ra : ra + rb, :, start + w - wb : start + w] = xb[:, :, tb:]
            pair.append(out)
        layer.adopt(pair[0], pair[1], start + w, start=start, rows=ra + rb)
    return cache, mask


def row_tail_kv(cache: DynamicCache, row: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s keys/values in the last ``count`` columns (its newest tokens: rows are right aligned), as
    ``[1, heads, count, head_dim]`` copies."""
    return [(layer.keys[row : row + 1, :, -count:].clone(), layer.values[row : row + 1, :, -count:].clone())
            for layer in _growing_layers(cache)]


def row_kv(cache: DynamicCache, row: int, cols: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s keys/values at sequence columns ``cols``, as ``[1, heads, len(cols), head_dim]`` copies (indexing
    by a tensor copies already: no ``clone`` on top)."""
    return [(layer.keys[row : row + 1, :, cols], layer.values[row : row + 1, :, cols]) for layer in _growing_layers(cache)]


class PrefixStore:
    """KV of token prefixes, looked up by longest match. At most ``max_bytes`` of tensors (pinned entries
    count too); adding beyond it evicts the least recently used unpinned entries; an entry larger than what
    eviction can free is not stored. Not thread safe: the caller serialises (the running batch's lock).

    An entry can carry extensions (``extend``): tokens that followed its prompt in a sample, with the KV the
    sample's decoding computed for them. A lookup that matches the entry goes on into its extension sharing the
    most tokens with the prompt looked up (a causal model's KV of a token depends only on the tokens before it,
    so any shared head of an extension serves). A child's prompt is its parent's prompt + the parent's step
    (re-tokenized, which mostly gives the sampled tokens back) + the step's output: measured on the embedded
    model, 32.4 of a sample's 33.5 decoded tokens on average matched its child prompt's tokens."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: must be >= 0 (0 stores nothing)")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[list, int, bool]] = OrderedDict()  # kv, bytes, pinned
        self._lengths: dict[int, int] = {}  # prefix length -> entries of that length
        self._extensions: dict[tuple[int, ...], list[tuple[tuple[int, ...], list, int]]] = {}  # tail, kv, bytes
        self.hits = self.lookups = self.evictions = 0
        self.extension_tokens = 0  # tokens whose KV lookups served from extensions (samples' decoded KV)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def extension_bytes(self) -> int:
        """Bytes of the samples' KV kept with entries (``extend``), part of ``bytes``."""
        return sum(b for exts in self._extensions.values() for _, _, b in exts)

    def add(self, ids: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]], pinned: bool = False) -> bool:
        """Stores ``kv`` (per layer, batch 1, ``len(ids)`` positions) for ``ids``; False when it cannot fit."""
        key = tuple(ids)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        pinned_bytes = sum(b for _, b, p in self._entries.values() if p)
        if pinned_bytes + size > self.max_bytes or not self._make_room(size):
            return False
        self._entries[key] = (kv, size, pinned)
        self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
        self.bytes += size
        return True

    def extend(self, ids: Sequence[int], tail: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Keeps ``kv`` (per layer, batch 1, ``len(tail)`` positions) for tokens ``tail`` that followed the stored
        prompt ``ids``, with that entry (dropped with it; it counts as used now). False when ``ids`` is not stored
        or pinned (pinned bytes stay what ``add`` checked), ``tail`` is empty, or there is no room without evicting
        the entry itself or pinned ones."""
        key, tail = tuple(ids), tuple(tail)
        if key not in self._entries or self._entries[key][2] or not tail:
            return False
        exts = self._extensions.get(key, [])
        if any(t == tail for t, _, _ in exts):
            return True
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        self._entries.move_to_end(key)
        if not self._make_room(size, spare=key):
            return False
        self._extensions.setdefault(key, []).append((tail, kv, size))
        self.bytes += size
        return True

    def _make_room(self, size: int, spare: tuple[int, ...] | None = None) -> bool:
        """Evicts least recently used unpinned entries (never ``spare``) until ``size`` more bytes fit; False if
        they cannot."""
        while self.bytes + size > self.max_bytes:
            victim = next((k for k, (_, _, p) in self._entries.items() if not p and k != spare), None)
            if victim is None:
                return False
            self._drop(victim)
            self.evictions += 1
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        _, size, _ = self._entries.pop(key)
        size += sum(b for _, _, b in self._extensions.pop(key, ()))
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
                kv = self._entries[key][0]
                m, tail_kv = self._longest_extension(key, ids[n:limit])
                if m:
                    self.extension_tokens += m
                    kv = [(torch.cat([k, tk[..., :m, :]], dim=-2), torch.cat([v, tv[..., :m, :]], dim=-2))
                          for (k, v), (tk, tv) in zip(kv, tail_kv, strict=True)]
                return n + m, kv
        return 0, None

    def _longest_extension(self, key: tuple[int, ...], rest: Sequence[int]) -> tuple[int, list | None]:
        best, best_kv = 0, None
        for tail, kv, _ in self._extensions.get(key, ()):
            m = 0
            for a, b in zip(tail, rest, strict=False):
                if a != b:
                    break
                m += 1
            if m > best:
                best, best_kv = m, kv
        return best, best_kv


GROUP_WIDTH_STEP = 64  # GroupKV pads a prompt to a multiple of this (its bucket's width)


class _Bucket:
    """Prompts padded to one width ``w``: per layer a buffer ``[slots, heads, w, head_dim]``, slots ``[0, R)`` in use,
    a prompt of ``n`` tokens in its slot's last ``n`` columns and zeros left of them (masked; zeros, not garbage,
    because a masked column's value still meets a zero weight and NaN bits would survive that)."""

    def __init__(self, width: int):
        self.width = width
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        n, r, w = kv[0][0].shape[-2], len(self.lengths), self.width
        if not self.k or r == self.k[0].shape[0]:
            slots = max(4, 2 * r)
            grown_k, grown_v = [], []
            for li, (k, v) in enumerate(kv):
                nk = k.new_empty((slots, k.shape[1], w, k.shape[-1]))
                nv = v.new_empty((slots, v.shape[1], w, v.shape[-1]))
                if r:
                    nk[:r], nv[:r] = self.k[li][:r], self.v[li][:r]
                grown_k.append(nk)
                grown_v.append(nv)
            self.k, self.v = grown_k, grown_v
        for bk, bv, (k, v) in zip(self.k, self.v, kv, strict=True):
            bk[r, :, : w - n] = 0
            bv[r, :, : w - n] = 0
            bk[r, :, w - n :] = k[0]
            bv[r, :, w - n :] = v[0]
        self.lengths.append(n)
        return r

    def remove(self, slot: int) -> int | None:
        """Frees ``slot``; the last slot moves into it (returns the index it came from) unless it was the last."""
        last = len(self.lengths) - 1
        moved = None
        if slot != last:
            for buf in self.k + self.v:
                buf[slot] = buf[last]
            self.lengths[slot] = self.lengths[last]
            moved = last
        self.lengths.pop()
        return moved

    def view(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        r, w = len(self.lengths), self.width
        layers = [(k[:r], v[:r]) for k, v in zip(self.k, self.v, strict=True)]
        if all(n == w for n in self.lengths):
            return layers, None
        lengths = torch.tensor(self.lengths, device=self.k[0].device)
        pad = torch.arange(w, device=lengths.device)[None, :] < (w - lengths)[:, None]
        mask = torch.zeros((r, 1, 1, w), dtype=self.k[0].dtype, device=lengths.device)
        return layers, mask.masked_fill_(pad[:, None, None, :], float("-inf"))


class GroupKV:
    """The running batch's prompt KV (what follows the shared prefix), one slot per distinct running prompt, which
    all the prompt's rows attend to (``cascade.GroupPrefix``) instead of each holding a copy.

    A prompt of ``n`` tokens goes to the bucket of width ``n`` rounded up to ``GROUP_WIDTH_STEP``; attention runs
    once per bucket. Buckets, not one buffer padded to the longest running prompt, because CPU attention's last
    bits depend on how many (masked) columns it runs over: a request's rows would then decode other bits beside
    a longer prompt than alone. A bucket's width is a function of the prompt's own length, so they do not.
    A slot is ``(width, index)``; freeing one moves the bucket's last slot into it."""

    def __init__(self, step: int = GROUP_WIDTH_STEP):
        self.step = step
        self.buckets: dict[int, _Bucket] = {}
        self._slots: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt -> slot
        self._prompts: dict[tuple[int, int], tuple[int, ...]] = {}  # slot -> prompt
        self.rows: dict[tuple[int, int], int] = {}  # slot -> running rows attending to it

    def __len__(self) -> int:
        return len(self._slots)

    def acquire(self, ids: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> tuple[int, int]:
        """The slot holding prompt ``ids`` (added from ``kv``, per layer ``[1, heads, n, head_dim]``, unless it is
        running already), with ``rows`` more rows on it."""
        slot = self._slots.get(ids)
        if slot is None:
            n = kv[0][0].shape[-2]
            width = -(-n // self.step) * self.step
            bucket = self.buckets.setdefault(width, _Bucket(width))
            slot = (width, bucket.add(kv))
            self._slots[ids], self._prompts[slot] = slot, ids
            self.rows[slot] = 0
        self.rows[slot] += rows
        return slot

    def release(self, slot: tuple[int, int]) -> tuple[int, int] | None:
        """One row less on ``slot``; at none the slot is freed. Returns the slot whose rows must now read ``slot``
        (the bucket's last one moved into it), else None."""
        self.rows[slot] -= 1
        if self.rows[slot]:
            return None
        width, index = slot
        bucket = self.buckets[width]
        del self._slots[self._prompts.pop(slot)], self.rows[slot]
        moved = bucket.remove(index)
        if not bucket.lengths:
            del self.buckets[width]
        if moved is None:
            return None
        old = (width, moved)
        ids = self._prompts.pop(old)
        self._prompts[slot], self._slots[ids], self.rows[slot] = ids, slot, self.rows.pop(old)
        return old

    def clear(self) -> None:
        self.buckets, self._slots, self._prompts, self.rows = {}, {}, {}, {}

    def prefix(self, row_slots: Sequence[tuple[int, int]], device) -> GroupPrefix:
        """The ``group_prefix=`` of a forward whose row i reads slot ``row_slots[i]``: per bucket, slot r's j-th query
        place holds its j-th row; places past a slot's rows repeat its first row (computed, not read)."""
        from pipeline.engines.cascade import GroupPart, GroupPrefix

        members: dict[tuple[int, int], list[int]] = {}
        for i, slot in enumerate(row_slots):
            members.setdefault(slot, []).append(i)
        if len(members) != len(self._slots):
            raise ValueError(f"rows read {len(members)} of the {len(self._slots)} prompts held: a slot without rows "
                             f"would be attended to by a query place of some other row")
        parts, scatter, base = [], [0] * len(row_slots), 0
        for width, bucket in self.buckets.items():
            slots = [members[(width, r)] for r in range(len(bucket.lengths))]
            kmax = max(map(len, slots))
            gather: list[int] = []
            for r, rows in enumerate(slots):
                for j, i in enumerate(rows):
                    scatter[i] = base + r * kmax + j
                gather += rows + [rows[0]] * (kmax - len(rows))
            layers, mask = bucket.view()
            parts.append(GroupPart(layers, mask, torch.tensor(gather, device=device), kmax))
            base += len(gather)
        return GroupPrefix(parts, torch.tensor(scatter, device=device))
