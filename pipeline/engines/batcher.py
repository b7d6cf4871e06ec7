"""Continuous batching for the transformers policy: one running batch shared by every caller of the engine.

Every ``generate`` call (each tree group of each rollout worker, arriving on the engine actor's threads)
adds its requests to one queue and waits; the process's compute thread (``pipeline.engines.compute``)
advances the whole batch tick by tick while there is work. A tick:

1. admits queued requests while their rows fit (``max_rows``): their distinct prompts are prefilled in one
   forward on top of the longest prefixes already in the ``PrefixStore`` (the instruction prefix, a parent
   node's question + history), each prompt's KV is stored for its children, copied to its ``k`` sample rows,
   and joined to the running rows (``kv_cache.join_left_padded``);
2. samples one token for every row, each row from its own ``torch.Generator`` (seeded from the request's
   seed and the sample index), so a row's tokens do not depend on which other rows share the batch;
3. retires rows that wrote a stop string, EOS or ran out of budget; their slots are free for step 1 of
   the next tick, so the batch does not shrink as rows stop at different lengths;
4. decodes the remaining rows one step.

With ``fused`` (``engines.fused_admission``, on with cascade attention) steps 1 and 4 are one forward at the end
of the tick: the running rows' next tokens and the admitted prompts' tokens go through the model as one flattened
sequence (``cascade.Ragged``), so admitting a request costs its tokens, not a forward of its own that every running
row waits for; the admitted rows' first logits come out of that forward and are sampled at the next tick.

Row layout in the cache: ``[left padding | prompt | generated]``; the attention mask zeroes the padding and
position ids skip it, so every row sees the positions it would alone. Under cascade attention
(``pipeline.engines.cascade``) the engine's shared prefix (``prefix_ids``, ``shared``: its KV, held once) is not
in the rows' caches: a row holds ``[left padding | prompt after the prefix | generated]``, its positions start
after the prefix, every forward gets ``shared_prefix=shared``, and the prefix store keeps what follows it.
Why not transformers' own ``generate_batch`` / ``ContinuousBatchingManager``: it samples every request from
one global generator (``torch.multinomial``, seeded once per manager), so a request's samples depend on what
else is running, and it has no stop strings; see the README's generation section for what was measured.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.engines import compute
from pipeline.engines.kv_cache import (
    GroupKV,
    PrefixStore,
    cache_kwargs,
    cache_of,
    compact_rows,
    growing_cache,
    join_left_padded,
    row_kv,
    row_tail_kv,
)


@dataclass
class Request:
    """One prompt, ``k`` samples. ``tokens[j]`` are sample j's new tokens (stop/EOS tokens excluded)."""

    ids: list[int]
    seeds: list[int]  # one per sample
    budget: int  # new tokens per sample
    temperature: float
    top_p: float
    tokens: list[list[int]] = field(default_factory=list)
    open_rows: int = 0
    done: bool = False
    error: BaseException | None = None

    @property
    def k(self) -> int:
        return len(self.seeds)


@dataclass
class _Row:
    req: Request
    j: int
    gen: torch.Generator
    slot: tuple[int, int] | None = None  # under group attention: the GroupKV slot of the row's prompt


class RunningBatch:
    """The engine's one running batch. ``run(requests)`` returns when they are all finished."""

    def __init__(self, model, device: str, max_rows: int, store: PrefixStore, pad_id: int,
                 eos_ids: frozenset[int], is_stop: Callable[[list[int]], bool], sample: Callable, stats):
        self.model, self.device, self.max_rows = model, device, max_rows
        self.store, self.pad_id, self.eos_ids = store, pad_id, eos_ids
        self.is_stop, self.sample, self.stats = is_stop, sample, stats
        self._cond = threading.Condition()  # callers wait on it; notified after each tick
        self._scheduled = False  # a tick is queued on the compute thread (or running)
        self._queue: deque[Request] = deque()
        self._queue_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._cache = self._mask = self._pos = self._logits = None
        self.prefix_ids: list[int] | None = None  # the engine's shared prefix (set by the policy's first call)
        self.shared: list | None = None  # its per-layer KV, under cascade attention; None: rows hold it themselves
        # Group attention (set with ``shared``): a prompt's KV is held once (``groups``) for the request's rows, which
        # hold only their generated tokens; False: every row holds a copy of its prompt.
        self.grouped = False
        # Fused ticks (``_admit_fused``): admitted prompts are computed in the running rows' decode forward. Needs
        # the model's attention to be ``cascade.attention`` (the policy sets it with cascade attention).
        self.fused = False
        self.groups = GroupKV()
        self.peak_slots = 0  # most prompts held in ``groups`` together
        self.peak_rows = 0  # most rows decoded together
        self.joins = 0  # admissions into a batch that was already running (refills)
        self.joins_copied = 0  # of those, joins that copied the running rows (no free slot or headroom left)
        self.ticks = 0

    @property
    def rows(self) -> int:
        return len(self._rows)

    # -- callers -------------------------------------------------------------------------------------

    def run(self, requests: Sequence[Request]) -> None:
        with self._queue_lock:
            self._queue.extend(requests)
        if compute.is_compute_thread():  # nobody else can tick: drive the batch here until these are done
            while not all(r.done for r in requests):
                self._step(resubmit=False)
        else:
            with self._cond:
                if not self._scheduled:
                    self._scheduled = True
                    compute.submit(self._step)
                while not all(r.done for r in requests):
                    self._cond.wait()
        for r in requests:
            if r.error is not None:
                raise r.error

    def _step(self, resubmit: bool = True) -> None:
        """One tick, on the process's compute thread (``pipeline.engines.compute``: a second thread computing
        beside it would make both slower), queued again while there is work. One tick per turn, so that other
        work of the process (a PPM scorer's forwards) takes its turn between ticks. One thread, not the callers
        in turn, also for memory: tensors allocated by many threads land in many malloc arenas, and the engine
        actor's resident memory grew to 12.7 GB that way in bench_rollouts (Ray killed it for memory)."""
        with torch.inference_mode():
            try:
                self._tick()
            except BaseException as e:
                self._fail(e)
        with self._cond:
            self._cond.notify_all()
            if not resubmit:
                return
            with self._queue_lock:
                more = bool(self._rows or self._queue)
            if more:
                compute.submit(self._step)
            else:
                self._scheduled = False

    def _fail(self, e: BaseException) -> None:
        """A tick raised: every running and queued request fails with it (the batch's state is unknown)."""
        with self._queue_lock:
            victims = {id(r.req): r.req for r in self._rows} | {id(r): r for r in self._queue}
            self._queue.clear()
        for r in victims.values():
            r.error, r.done = e, True
        self._rows = []
        self._cache = self._mask = self._pos = self._logits = None
        self.groups.clear()

    # -- one tick ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.ticks += 1
        if self.fused:
            chosen = self._sample_and_retire() if self._rows else []
            self._admit_fused(chosen)
            return
        self._admit()
        if not self._rows:
            return
        chosen = self._sample_and_retire()
        if not self._rows:
            return
        t2 = time.perf_counter()
        dev = self.device
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=-1)
        out = self.model(input_ids=torch.tensor(chosen, device=dev).unsqueeze(-1), attention_mask=self._mask,
                         position_ids=self._pos.unsqueeze(-1), **cache_kwargs(self.model, self._cache), use_cache=True,
                         **self._shared(), **self._group_prefix())
        self._logits = out.logits[:, -1, :].float()
        self._pos = self._pos + 1
        self.stats.decode_ticks += 1
        self.stats.decode_s += time.perf_counter() - t2

    def _sample_and_retire(self) -> list[int]:
        """Steps 2-3: one token for every row, then the rows that stopped leave; returns the remaining rows' tokens
        (the next forward's input), in the rows' new order."""
        t0 = time.perf_counter()
        chosen = self._sample_all()
        t1 = time.perf_counter()
        self.stats.sample_s += t1 - t0
        keep: list[int] = []
        ended: list[tuple[int, Request, list[int]]] = []  # rows that stopped at a stop string or their budget
        released: list[tuple[int, int]] = []  # GroupKV slots of the rows that stopped
        for pos, (row, tok) in enumerate(zip(self._rows, chosen, strict=True)):
            self.stats.new_tokens += 1
            toks = row.req.tokens[row.j]
            if tok not in self.eos_ids:
                toks.append(tok)
                if len(toks) < row.req.budget and not self.is_stop(toks):
                    keep.append(pos)
                    continue
                ended.append((pos, row.req, toks))
            if row.slot is not None:
                released.append(row.slot)
            row.req.open_rows -= 1
            if row.req.open_rows == 0:
                row.req.done = True
        if ended and self.store.max_bytes:
            self._keep_sampled_kv(ended)
        if len(keep) < len(self._rows):
            order = self._select(keep)
            chosen = [chosen[i] for i in order]
        if released and self._rows:
            self._release(released)
        self.stats.retire_s += time.perf_counter() - t1
        return chosen

    def _admit_fused(self, chosen: list[int]) -> None:
        """Steps 1 and 4 in one forward (``fused``): the running rows' next tokens and the admitted prompts' tokens
        side by side in one flattened sequence (``cascade.Ragged``), so an admission does not pay a forward of its
        own: a forward's fixed cost (every weight read once, ~30 layers of kernel calls) is ~38 ms on the embedded
        model, a 30-token prompt adds ~13 ms to it (measured 2026-12-02), and the rollout phase admits a request
        every few decode steps. The admitted rows' first logits come out of this forward and are sampled next tick."""
        from pipeline.engines import cascade

        if getattr(self.model.config, "_attn_implementation", None) != cascade.NAME:
            raise RuntimeError("fused admissions need the model's attention to be cascade.attention (its forward would "
                               "ignore the flattened tick's layout): set engines.fused_admission false")
        take = self._take()
        if not take and not self._rows:
            return
        self.joins += bool(take and self._rows)
        try:
            t0 = time.perf_counter()
            adm = self._prepare(take) if take else None
            t1 = time.perf_counter()
            self.stats.prefill_s += t1 - t0
            dev, rows = self.device, len(self._rows)
            ids, pos, keep = [], [], list(range(rows))
            row_mask = None
            if rows:
                self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=-1)
                row_mask = torch.zeros(self._mask.shape, dtype=self.model.dtype, device=dev).masked_fill_(
                    self._mask == 0, float("-inf"))[:, None, None, :]
                ids.append(torch.tensor(chosen, device=dev))
                pos.append(self._pos)
            if adm is not None:
                ids.append(adm.input_ids.to(dev).reshape(-1))
                pos.append(adm.positions.to(dev).reshape(-1))
                keep += [rows + (i + 1) * adm.width - 1 for i in range(len(adm.prompts))]
            ragged = cascade.Ragged(rows, self._cache if rows else None, row_mask,
                                    self._group_prefix().get("group_prefix") if rows else None,
                                    len(adm.prompts) if adm else 0, adm.width if adm else 0,
                                    adm.cache if adm else None, adm.attention if adm else None)
            out = self.model(input_ids=torch.cat(ids).unsqueeze(0), position_ids=torch.cat(pos).unsqueeze(0),
                             use_cache=False, logits_to_keep=torch.tensor(keep, device=dev), ragged=ragged,
                             **self._shared())
            logits = out.logits[0].float()
            t2 = time.perf_counter()
            if rows:
                self._logits = logits[:rows]
                self._pos = self._pos + 1
                self.stats.decode_ticks += 1
                self.stats.decode_s += t2 - t1
            else:
                self.stats.prefill_s += t2 - t1
            if adm is not None:
                self._join(take, adm, logits[rows:])
        except BaseException as e:  # taken off the queue but not yet running: _fail would not see them
            for r in take:
                if not r.done:
                    r.error, r.done = e, True
            raise

    def _keep_sampled_kv(self, ended: list[tuple[int, Request, list[int]]]) -> None:
        """Each stopped row's decoded tokens' KV goes to the prefix store with its prompt's entry: a child's prompt
        starts with the parent's prompt and (mostly) these very tokens, which it then need not prefill. The
        row's last sampled token was never decoded (no KV); rows that wrote EOS end a solution and are skipped.
        Cost: a copy of the row's new columns (~0.8 MB for 33 bf16 tokens on the embedded model)."""
        for pos, req, toks in ended:
            fed = len(toks) - 1
            if fed > 0:
                self.store.extend(req.ids, toks[:fed], row_tail_kv(self._cache, pos, fed))

    def _shared(self) -> dict:
        return {"shared_prefix": self.shared} if self.shared is not None else {}

    # -- group attention -------------------------------------------------------------------------------

    def _group_prefix(self) -> dict:
        if not self.grouped:
            return {}
        return {"group_prefix": self.groups.prefix([row.slot for row in self._rows], self.device)}

    def _release(self, released: list[tuple[int, int]]) -> None:
        """The stopped rows leave their GroupKV slots; a slot moved into a freed one takes its rows along."""
        pending = list(released)
        while pending:
            slot = pending.pop()
            moved = self.groups.release(slot)
            if moved is not None:
                for row in self._rows:
                    if row.slot == moved:
                        row.slot = slot
                pending = [slot if s == moved else s for s in pending]

    def _select(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep``; returns the rows' new order (``kv_cache.compact_rows``: slots refilled in place)."""
        if not keep:
            self._rows = []
            self._cache = self._mask = self._pos = self._logits = None
            self.groups.clear()
            return []
        order = compact_rows(self._cache, keep)
        self._rows = [self._rows[i] for i in order]
        sel = torch.tensor(order, device=self.device)
        self._mask, self._pos = self._mask[sel], self._pos[sel]
        # No logits to gather: _sample_all consumed this tick's (rows x vocabulary floats, 16 MB at 84 rows).
        return order

    def _sample_all(self) -> list[int]:
        """One token per row; rows are grouped by their sampling settings (requests may differ in them)."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(self._rows):
            groups.setdefault((row.req.temperature, row.req.top_p), []).append(i)
        out = [0] * len(self._rows)
        for (temp, top_p), idx in groups.items():
            logits = self._logits if len(groups) == 1 else self._logits[torch.tensor(idx, device=self.device)]
            # The logits are this tick's scratch: sampled once, then replaced by the next forward's.
            picks = self.sample(logits, [self._rows[i].gen for i in idx], temp, top_p, overwrite=True).tolist()
            for i, t in zip(idx, picks, strict=True):
                out[i] = t
        self._logits = None  # overwritten by the sampler: never to be read again
        return out

    # -- admission -----------------------------------------------------------------------------------

    def _take(self) -> list[Request]:
        # Requests join in arrival order as soon as the queue's head fits (a request's k rows join together, so
        # its prompt is prefilled once); a request wider than the whole batch runs once the batch is empty.
        free = self.max_rows - len(self._rows)
        take: list[Request] = []
        with self._queue_lock:
            while self._queue and (self._queue[0].k <= free or not (self._rows or take)):
                req = self._queue.popleft()
                free -= req.k
                take.append(req)
        return take

    def _admit(self) -> None:
        take = self._take()
        if take:
            self.joins += bool(self._rows)
            try:
                self._prefill(take)
            except BaseException as e:  # taken off the queue but not yet running: _fail would not see them
                for r in take:
                    r.error, r.done = e, True
                raise

    def _prefill(self, reqs: list[Request]) -> None:
        """Admission in a forward of its own (without ``fused``): the admitted prompts only."""
        adm = self._prepare(reqs)
        t0 = time.perf_counter()
        out = self.model(input_ids=adm.input_ids.to(self.device), attention_mask=adm.mask.to(self.device),
                         position_ids=adm.positions.to(self.device), **cache_kwargs(self.model, adm.cache),
                         use_cache=True, logits_to_keep=1, **self._shared())
        self.stats.prefill_s += time.perf_counter() - t0
        self._join(reqs, adm, out.logits[:, -1, :].float())

    def _prepare(self, reqs: list[Request]) -> _Admission:
        """The admitted requests' distinct prompts, each on top of the longest prefix the store holds for it: their
        tokens still to compute (left padded to one width), masks, positions and a cache of the stored KV."""
        dev = self.device
        uniq: dict[tuple[int, ...], int] = {}
        for r in reqs:
            uniq.setdefault(tuple(r.ids), len(uniq))
        prompts = list(uniq)
        # Under cascade attention rows hold what follows the shared prefix: lengths and stored KV start there.
        skip = len(self.prefix_ids or ()) if self.shared is not None else 0
        found = []
        for ids in prompts:
            n, kv = self.store.longest(ids, len(ids))
            if n < skip:
                raise RuntimeError(f"a prompt of {len(ids)} tokens does not start with the stored shared prefix "
                                   f"({skip} tokens) its rows attend to under cascade attention")
            n -= skip  # positions of the stored entry (entries hold what follows the prefix)
            if n + skip == len(ids):  # the whole prompt is stored (a re-visit): recompute its last token for logits
                if n == 0:
                    raise RuntimeError("a prompt equal to the shared prefix has no token of its own to decode from")
                n, kv = n - 1, [(k[..., : n - 1, :], v[..., : n - 1, :]) for k, v in kv]
            found.append((n, kv if n else None))
        p = max(n for n, _ in found)
        width = max(len(ids) - skip - n for ids, (n, _) in zip(prompts, found, strict=True))
        n_u = len(prompts)
        input_ids = torch.full((n_u, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n_u, p + width), dtype=torch.long)
        for i, (ids, (n, _)) in enumerate(zip(prompts, found, strict=True)):
            suffix = ids[skip + n :]
            input_ids[i, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
            mask[i, p - n : p] = 1
            mask[i, p + width - len(suffix) :] = 1
        # Stored prefix KV, left padded to p columns (zeros where a row's prefix is shorter: masked out).
        if p:
            layers = []
            template = next(kv for _, kv in found if kv is not None)
            for li, (k0, v0) in enumerate(template):
                k = k0.new_zeros((n_u, k0.shape[1], p, k0.shape[-1]))
                v = v0.new_zeros((n_u, v0.shape[1], p, v0.shape[-1]))
                for i, (n, kv) in enumerate(found):
                    if n:
                        k[i, :, p - n :] = kv[li][0][0]
                        v[i, :, p - n :] = kv[li][1][0]
                layers.append((k, v))
            cache = cache_of(self.model.config, layers, spare=width + 64)
        else:
            cache = growing_cache(self.model.config)
        positions = skip + (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        attention = None
        if self.fused:  # the boolean mask sdpa_mask would build: padding, causal, no query left attending to nothing
            allowed = mask.to(dev).bool()[:, None, None, :] & torch.ones(width, p + width, dtype=torch.bool,
                                                                         device=dev).tril(p)
            attention = allowed | ~allowed.any(-1, keepdim=True)
        self.stats.prompt_tokens += sum(map(len, prompts))
        self.stats.prefill_tokens += sum(len(ids) - skip - n for ids, (n, _) in zip(prompts, found, strict=True))
        self.stats.reused_tokens += sum(skip + n for n, _ in found)
        return _Admission(prompts, uniq, width, input_ids, mask, positions, cache, attention)

    def _join(self, reqs: list[Request], adm: _Admission, logits: torch.Tensor) -> None:
        """The admitted prompts, computed (``adm.cache`` holds their KV, ``logits`` each one's last logits): every
        prompt's KV to the store, ``k`` rows per request joined to the running batch."""
        t1 = time.perf_counter()
        dev = self.device
        cache, n_u = adm.cache, len(adm.prompts)
        mask = adm.mask.to(dev)
        # Every prompt's KV goes to the store: its children's prompts start with it.
        kvs = [row_kv(cache, i, mask[i].nonzero().squeeze(-1)) for i in range(n_u)]
        for ids, kv in zip(adm.prompts, kvs, strict=True):
            self.store.add(ids, kv)
        # k rows per request. Grouped: the rows start empty and attend to their prompt's GroupKV slot; otherwise
        # each is a copy of its prompt's row.
        rows: list[_Row] = []
        src: list[int] = []
        for r in reqs:
            r.tokens = [[] for _ in range(r.k)]
            r.open_rows = r.k
            slot = self.groups.acquire(tuple(r.ids), kvs[adm.index[tuple(r.ids)]], r.k) if self.grouped else None
            for j, seed in enumerate(r.seeds):
                g = torch.Generator(device=dev)
                g.manual_seed(seed)
                rows.append(_Row(r, j, g, slot))
                src.append(adm.index[tuple(r.ids)])
        sel = torch.tensor(src, device=dev)
        logits = logits[sel]
        if self.grouped:
            cache = cache_of(self.model.config, [(k.new_empty((len(rows), k.shape[1], 0, k.shape[-1])),
                                                  v.new_empty((len(rows), v.shape[1], 0, v.shape[-1])))
                                                 for k, v in kvs[0]], spare=0)
            new_mask = mask.new_zeros((len(rows), 0))
        else:
            cache.batch_select_indices(sel)
            new_mask = mask[sel]
        pos = torch.tensor([len(r.req.ids) for r in rows], device=dev)
        running = self._cache
        self._cache, self._mask = join_left_padded(self.model.config, running, self._mask, cache, new_mask,
                                                   slots=self.max_rows)
        self.joins_copied += running is not None and self._cache is not running
        self._pos = pos if self._pos is None else torch.cat([self._pos, pos])
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._rows += rows
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self.peak_slots = max(self.peak_slots, len(self.groups))
        self.stats.join_s += time.perf_counter() - t1


@dataclass
class _Admission:
    """``RunningBatch._prepare``'s result: ``prompts`` (distinct, ``index``: prompt -> its place), each one's tokens
    still to compute (``input_ids`` ``[prompts, width]``, left padded), ``mask`` ``[prompts, p + width]`` over the
    stored prefix columns and those, ``positions`` ``[prompts, width]``, ``cache`` the stored KV (``p`` columns) that
    the forward extends, and ``attention`` (fused forwards only) the boolean mask ``[prompts, 1, width, p + width]``."""

    prompts: list[tuple[int, ...]]
    index: dict[tuple[int, ...], int]
    width: int
    input_ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object
    attention: torch.Tensor | None
