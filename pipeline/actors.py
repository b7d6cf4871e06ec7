"""The Ray actors of the rollout phase, thin wrappers around library objects.

* ``PolicyEngine``: holds one policy backend (``mcts.protocols.Policy``, built in the actor by a factory so
  the model loads where the GPU is). It serves ``propose`` calls concurrently (a threaded actor) when the
  backend batches concurrent callers itself (``concurrent_calls``: the transformers backend's running batch
  takes every tree group's and worker's requests into one batch; vLLM's ``AsyncLLM`` batches whatever is in
  flight), else one at a time (offline ``vllm.LLM``, HTTP). It measures its own
  busy time (time with at least one call in progress), the numerator of engine utilisation.
* ``ScorerEngine``: the same for the PPM (``mcts.protocols.Scorer``).
* ``RolloutWorker``: owns a shard of problems and its own sandbox executor, runs MCTS over all of them
  (``mcts.search.TreeSearch`` driven by ``mcts.wave.run_wave``) and streams each finished tree back as
  soon as it is done (a Ray streaming generator), then one ``WorkerReport``.

Overlap of generation and code execution: a worker splits its trees into ``groups`` (2 by default) and
runs each group's waves in its own thread. While one group's batch is with the engine (its thread waits in
``ray.get``), another group's code runs in the sandbox, and then sends its own batch, which queues at the
engine behind the first. With execution no slower than generation the engine never idles.

Failures: the worker talks to engines through ``RemotePolicy`` / ``RemoteScorer``, which retry a request
that died with its engine actor (Ray restarts the actor, up to ``max_restarts``) on the least loaded engine,
and count the retries. A dying worker is the driver's business (``pipeline.rollouts`` reassigns its
unfinished problems). The classes here are plain Python; ``actor_class`` turns one into a Ray actor class,
so this module imports without Ray and the classes can be tested in-process.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcts.config import SearchConfig
from mcts.protocols import ExecRequest, Executor, Grader, Policy, Proposal, Scorer, SearchState


class EngineUnavailable(RuntimeError):
    """Every attempt at an engine request failed because engine actors died; the message says how often."""


# Calls a policy engine actor serves at once: every tree group of every worker on it (their requests share
# one running batch when the backend allows; see PolicyEngine).
ENGINE_CONCURRENCY = 64


@functools.cache
def actor_class(cls: type) -> Any:
    """The Ray actor class of ``cls`` (``PolicyEngine``, ``ScorerEngine`` or ``RolloutWorker``)."""
    import ray

    if cls is PolicyEngine:
        return ray.remote(max_concurrency=ENGINE_CONCURRENCY)(cls)
    return ray.remote(cls)


# --------------------------------------------------------------------------------------------- engines


BATCH_PARTS = ("prefill", "join", "sample", "retire", "decode")  # GenStats' <part>_s clocks


@dataclass(frozen=True)
class EngineStats:
    """What one engine actor did since it (last) started. Times in seconds; ``started_at`` is epoch time."""

    busy_s: float  # wall time spent inside backend calls
    calls: int
    items: int  # states proposed for / scored
    outputs: int  # proposals returned (or scores)
    tokens: int  # new tokens generated, when the backend counts them (``stats.new_tokens``); else 0
    started_at: float
    pid: int
    # The transformers backend's running batch (``GenStats``): decode steps that ran rows, and seconds per part of
    # a tick (prefill, join, sample, retire, decode); empty for backends that do not keep them.
    decode_ticks: int = 0
    parts_s: dict[str, float] = field(default_factory=dict)
    # Prompt tokens of the requests, and of those the ones a cache served (the transformers backend's shared
    # prefix and prefix store, vLLM's prefix cache): their ratio is the engine's prefix hit rate.
    prompt_tokens: int = 0
    cached_tokens: int = 0


class _Metered:
    """Busy-time and token accounting shared by the two engine actors."""

    def __init__(self, backend: object):
        self.backend = backend
        self._busy = 0.0
        self._calls = self._items = self._outputs = 0
        self._started = time.time()
        self._lock = threading.Lock()
        self._inflight = 0
        self._busy_since = 0.0

    def _tokens(self) -> int:
        # The policy backends keep cumulative counters in ``stats`` (pipeline.engines.common.GenStats).
        return int(getattr(getattr(self.backend, "stats", None), "new_tokens", 0) or 0)

    def _timed(self, fn: Callable[[], list], n_items: int) -> list:
        # Busy time is the union of the calls' intervals: concurrent calls share one batch, not add up.
        with self._lock:
            if not self._inflight:
                self._busy_since = time.perf_counter()
            self._inflight += 1
        try:
            out = fn()
        finally:
            with self._lock:
                self._inflight -= 1
                if not self._inflight:
                    self._busy += time.perf_counter() - self._busy_since
                self._calls += 1
                self._items += n_items
        with self._lock:
            self._outputs += sum(len(o) for o in out) if out and isinstance(out[0], list) else len(out)
        return out

    def ready(self) -> int:
        """Returns the actor's pid once the backend is built (raises the factory's error otherwise)."""
        return os.getpid()

    def stats(self) -> EngineStats:
        gen = getattr(self.backend, "stats", None)
        parts = {p: float(getattr(gen, f"{p}_s")) for p in BATCH_PARTS if hasattr(gen, f"{p}_s")}
        return EngineStats(busy_s=self._busy, calls=self._calls, items=self._items, outputs=self._outputs,
                           tokens=self._tokens(), started_at=self._started, pid=os.getpid(),
                           decode_ticks=int(getattr(gen, "decode_ticks", 0) or 0), parts_s=parts,
                           prompt_tokens=int(getattr(gen, "prompt_tokens", 0) or 0),
                           cached_tokens=int(getattr(gen, "reused_tokens", 0) or 0))


class PolicyEngine(_Metered):
    """A policy backend behind an actor. ``factory()`` builds it inside the actor (model loads there)."""

    def __init__(self, factory: Callable[[], Policy]):
        super().__init__(factory())
        # A backend that does not batch concurrent callers itself gets them one at a time.
        self._serial = None if getattr(self.backend, "concurrent_calls", False) else threading.Lock()

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        if self._serial is None:
            return self._timed(lambda: self.backend.propose(states, k), len(states))
        with self._serial:
            return self._timed(lambda: self.backend.propose(states, k), len(states))


class ScorerEngine(_Metered):
    """A PPM scorer behind an actor. ``factory()`` builds it inside the actor."""

    def __init__(self, factory: Callable[[], Scorer]):
        super().__init__(factory())

    def score(self, states: Sequence[SearchState]) -> list[float]:
        return self._timed(lambda: list(self.backend.score(states)), len(states))


class _RemoteEngines:
    """Sends each request to the least busy live engine actor; retries requests whose engine died."""

    def __init__(self, engines: Sequence[Any], retries: int, backoff_s: float, prefer: int = 0,
                 restart_wait_s: float = 900.0):
        if not engines:
            raise ValueError("no engine actors were given")
        self._engines = list(engines)
        self._retries = retries
        self._backoff = backoff_s
        self._restart_wait = restart_wait_s
        self._inflight = [0] * len(engines)
        # Workers start at different engines so that n workers on n engines spread out from the first call.
        self._order = [(prefer + i) % len(engines) for i in range(len(engines))]
        self._lock = threading.Lock()
        self.retried = 0  # requests re-sent after their engine actor died
        self.failures: list[str] = []  # one line per failed attempt, for the report

    def _call(self, method: str, *args: Any) -> list:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        last: BaseException | None = None
        attempt = 0  # deaths of the engine answering: each is one of the ``retries``
        waited = 0.0  # seconds spent waiting for restarting engines, bounded by ``restart_wait_s``
        polls = 0
        while True:
            with self._lock:
                i = min(self._order, key=lambda j: self._inflight[j])
                self._inflight[i] += 1
            try:
                return ray.get(getattr(self._engines[i], method).remote(*args))
            except RayActorError as e:
                # The engine process died: Ray restarts it up to max_restarts times, and the request is re-sent, to
                # whichever engine is least busy then. While the engine is restarting (loading its model again:
                # seconds for the embedded model, minutes for a 7B one on a GPU), requests fail with
                # ActorUnavailableError: waiting for it does not use up a retry, up to restart_wait_s in all.
                restarting = isinstance(e, ActorUnavailableError)
                first = not (restarting and isinstance(last, ActorUnavailableError))  # one line per wait, not poll
                last = e
                with self._lock:
                    if first:
                        self.failures.append(f"engine {i} {method} attempt {attempt + 1}: {type(e).__name__}")
                    if first and (restarting or attempt < self._retries):
                        self.retried += 1
                if restarting and waited < self._restart_wait:
                    pause = min(max(self._backoff, 0.1) * 2 ** min(polls, 4), 10.0, self._restart_wait - waited)
                    time.sleep(pause)
                    waited += pause
                    polls += 1
                    continue
                if attempt >= self._retries:
                    break
                time.sleep(self._backoff * (2**attempt))
                attempt += 1
            finally:
                with self._lock:
                    self._inflight[i] -= 1
        raise EngineUnavailable(
            f"{method}: engine actors failed {attempt + 1} times in a row, and {waited:.0f} s were spent waiting for "
            f"restarting ones (last: {type(last).__name__}: {last}); raise ray.max_restarts or "
            f"rollouts.startup_timeout_s, or check the engine logs (ray logs / the Ray dashboard)")


class RemotePolicy(_RemoteEngines):
    """``mcts.protocols.Policy`` over policy engine actors."""

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        return self._call("propose", list(states), k)


class RemoteScorer(_RemoteEngines):
    """``mcts.protocols.Scorer`` over PPM scorer actors."""

    def score(self, states: Sequence[SearchState]) -> list[float]:
        return self._call("score", list(states))


# --------------------------------------------------------------------------------------------- rollout worker


@dataclass(frozen=True)
class WorkerSpec:
    """What every rollout worker of one round needs besides its problems."""

    search: SearchConfig  # the round's search (mode, rollouts, children from the round spec)
    run_seed: int
    round_no: int
    unsolved_rollouts: tuple[int, ...] = ()  # escalation stages for a tree still unsolved (RoundSpec's)
    groups: int = 2  # tree groups advanced by separate threads, so generation and execution overlap
    engine_retries: int = 3
    retry_backoff_s: float = 0.5
    restart_wait_s: float = 900.0  # waiting for restarting engines (rollouts.startup_timeout_s), not a retry


@dataclass(frozen=True)
class TreeDone:
    """One finished problem: its node-table rows and the counters the driver reports."""

    problem_id: str
    rows: Any  # pyarrow.Table in the ``trees`` schema (mcts.serialize)
    solved: bool  # some terminal was graded correct
    rollouts: int
    expansions: int
    proposals: int
    nodes: int
    worker: str


@dataclass(frozen=True)
class WorkerReport:
    """The last item of a worker's stream: where its time went. Seconds, summed over its group threads."""

    worker: str
    problems: int
    expansions: int
    engine_retries: int
    engine_failures: tuple[str, ...]
    propose_s: float  # waiting for policy engines (generation + queueing + transfer)
    exec_s: float  # in the sandbox executor
    score_s: float  # waiting for the PPM scorer
    search_s: float  # everything else in the group threads: MCTS bookkeeping, serialisation, Ray glue
    wall_s: float


@dataclass
class _Clock:
    propose: float = 0.0
    execute: float = 0.0
    score: float = 0.0
    total: float = 0.0
    expansions: int = 0


class _TimedPolicy:
    def __init__(self, inner: Policy, clock: _Clock):
        self.inner, self.clock = inner, clock

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        t0 = time.perf_counter()
        try:
            return self.inner.propose(states, k)
        finally:
            self.clock.propose += time.perf_counter() - t0


class _TimedScorer:
    def __init__(self, inner: Scorer, clock: _Clock):
        self.inner, self.clock = inner, clock

    def score(self, states: Sequence[SearchState]) -> list[float]:
        t0 = time.perf_counter()
        try:
            return self.inner.score(states)
        finally:
            self.clock.score += time.perf_counter() - t0


class _TimedExecutor:
    """Times one group's executor calls. The executor is shared by the worker's group threads, so it must be
    safe to call from several threads at once (``pipeline.sandbox.SandboxPool`` is: one reactor thread owns
    its processes and callers only wait on futures)."""

    def __init__(self, inner: Executor, clock: _Clock):
        self.inner, self.clock = inner, clock

    def run(self, requests: Sequence[ExecRequest]) -> list:
        t0 = time.perf_counter()
        try:
            return self.inner.run(requests)
        finally:
            self.clock.execute += time.perf_counter() - t0

    def release(self, tree_id: str) -> None:
        self.inner.release(tree_id)


_GROUP_DONE = object()


class RolloutWorker:
    """Runs MCTS over a shard of problems; see the module doc. One ``run`` at a time per actor."""

    def __init__(self, spec: WorkerSpec, name: str, index: int, engines: Sequence[Any], scorers: Sequence[Any],
                 executor_factory: Callable[[], Executor], grader: Grader):
        self.spec = spec
        self.name = name
        prefer = index  # worker i starts at engine i (mod engines)
        self.policy = RemotePolicy(engines, spec.engine_retries, spec.retry_backoff_s, prefer, spec.restart_wait_s)
        self.scorer = (RemoteScorer(scorers, spec.engine_retries, spec.retry_backoff_s, prefer, spec.restart_wait_s)
                       if scorers else None)
        self.executor_factory = executor_factory
        self.grader = grader
        self._stop = threading.Event()
        # Warm up the search and the Arrow serialisation while the driver waits for actors to start, not inside
        # the timed run: importing pyarrow and its first Table.from_pylist take ~0.5 s together.
        import mcts.search  # noqa: F401
        import mcts.wave  # noqa: F401
        from mcts.serialize import trees_to_table
        from mcts.tree import Tree, TreeInfo

        trees_to_table([Tree(TreeInfo("warm-up", "", "", spec.round_no, spec.search.mode, 1.0, 0))])

    def ready(self) -> int:
        return os.getpid()

    def run(self, problems: Sequence[Any]) -> Iterator[TreeDone | WorkerReport]:
        """Search every problem; yield a ``TreeDone`` per problem as it finishes, then one ``WorkerReport``."""
        from mcts.search import TreeSearch
        from mcts.seeds import tree_seed

        t0 = time.perf_counter()
        spec = self.spec
        searches = [TreeSearch(p, spec.search, tree_seed(spec.run_seed, spec.round_no, p.id), self.grader,
                               round_index=spec.round_no) for p in problems]
        n_groups = max(1, min(spec.groups, len(searches)))
        groups = [searches[g::n_groups] for g in range(n_groups)]
        clocks = [_Clock() for _ in groups]
        out: queue.Queue = queue.Queue()
        executor = self.executor_factory()
        threads = [threading.Thread(target=self._run_group, name=f"{self.name}-g{g}", daemon=True,
                                    args=(group, _TimedExecutor(executor, clock), clock, out))
                   for g, (group, clock) in enumerate(zip(groups, clocks, strict=True))]
        self._stop.clear()
        try:
            for t in threads:
                t.start()
            running = len(threads)
            while running:
                item = out.get()
                if item is _GROUP_DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise RuntimeError(f"rollout worker {self.name}: {type(item).__name__}: {item}") from item
                else:
                    yield item
            yield WorkerReport(
                worker=self.name, problems=len(searches), expansions=sum(c.expansions for c in clocks),
                engine_retries=self.policy.retried + (self.scorer.retried if self.scorer else 0),
                engine_failures=tuple(self.policy.failures + (self.scorer.failures if self.scorer else [])),
                propose_s=sum(c.propose for c in clocks), exec_s=sum(c.execute for c in clocks),
                score_s=sum(c.score for c in clocks),
                search_s=sum(c.total - c.propose - c.execute - c.score for c in clocks),
                wall_s=time.perf_counter() - t0)
        finally:
            self._stop.set()
            for t in threads:
                t.join()
            close = getattr(executor, "close", None)
            if close is not None:
                close()

    def _run_group(self, searches: list[Any], executor: _TimedExecutor, clock: _Clock, out: queue.Queue) -> None:
        from mcts.search import escalate, solved
        from mcts.seeds import escalation_seed
        from mcts.wave import run_wave

        t0 = time.perf_counter()
        try:
            policy = _TimedPolicy(self.policy, clock)
            scorer = _TimedScorer(self.scorer, clock) if self.scorer is not None else None
            finished: set[str] = set()
            spec = self.spec
            stages = spec.unsolved_rollouts
            stage: dict[str, int] = {}  # escalation stages a tree has entered
            retired = 0  # expansions of exhausted trees replaced by fresh ones

            def collect() -> None:
                nonlocal retired
                for i, s in enumerate(searches):
                    if not s.done or s.tree_id in finished:
                        continue
                    # Round 4: an unsolved tree enters the next stage (extended, or a fresh tree if exhausted).
                    while s.done and stage.get(s.tree_id, 0) < len(stages) and not solved(s):
                        k = stage[s.tree_id] = stage.get(s.tree_id, 0) + 1
                        if s.tree.root.closed:
                            executor.release(s.tree_id)  # the fresh tree reuses the tree id
                            retired += s.stats.expansions
                        seed = escalation_seed(spec.run_seed, spec.round_no, s.tree_id, k)
                        searches[i] = s = escalate(s, stages[k - 1], seed)
                    if not s.done:
                        continue
                    finished.add(s.tree_id)
                    executor.release(s.tree_id)
                    out.put(self._tree_done(s))

            collect()
            while len(finished) < len(searches):
                if self._stop.is_set():
                    return
                if run_wave(searches, policy, executor, scorer) == 0:
                    raise AssertionError(f"{len(searches) - len(finished)} searches neither done nor proposing")
                clock.expansions = retired + sum(s.stats.expansions for s in searches)
                collect()
            clock.total = time.perf_counter() - t0  # before the report is built from it
            out.put(_GROUP_DONE)
        except BaseException as e:  # handed to the generator, which raises it in the actor
            out.put(e)

    def _tree_done(self, search: Any) -> TreeDone:
        from mcts.search import solved
        from mcts.serialize import trees_to_table

        st = search.stats
        return TreeDone(problem_id=search.tree_id, rows=trees_to_table([search.tree]), solved=solved(search),
                        rollouts=search.tree.rollouts, expansions=st.expansions, proposals=st.proposals,
                        nodes=len(search.tree), worker=self.name)
