"""Many trees in lockstep: one wave = one expansion of every tree that waits for the policy.

A wave sends ONE ``policy.propose`` batch (one per distinct k, normally one; a tree with parallel rollouts adds a
state per rollout in flight), then one executor batch per
chain level (every tree's steps of that level together), then ONE scorer batch (PPM modes). It is built
on the per-tree protocol of ``mcts.search.TreeSearch`` and adds no search logic: a tree advanced by
waves ends exactly as the same tree advanced alone, because each tree's randomness is its own.

A worker that wants generation never to wait for the slowest tree skips the waves and drives each
``TreeSearch`` itself (``next_request`` / ``feed``), e.g. with ``answer_request`` from its own loop;
``run_lanes`` does that with one thread per search in flight, for a policy that batches concurrent callers
itself (the transformers engine's running batch).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

from mcts.protocols import Executor, Policy, Scorer
from mcts.search import ExecBatch, ProposeRequest, Request, ScoreBatch, TreeSearch


def _split(flat: Sequence[object], sizes: list[int], what: str) -> list[list[object]]:
    if len(flat) != sum(sizes):
        raise ValueError(f"{what} returned {len(flat)} results for {sum(sizes)} inputs")
    out, i = [], 0
    for n in sizes:
        out.append(list(flat[i : i + n]))
        i += n
    return out


def run_wave(searches: Sequence[TreeSearch], policy: Policy, executor: Executor, scorer: Scorer | None = None) -> int:
    """Advance every search waiting for proposals by one expansion (and any mid-expansion search to its end).

    Returns the number of searches that were given proposals (0: nothing left to propose).
    """
    proposing = _waiting(searches, ProposeRequest)
    by_k: dict[int, list[tuple[TreeSearch, ProposeRequest]]] = {}
    for s, req in proposing:
        by_k.setdefault(req.k, []).append((s, req))
    for k, group in by_k.items():
        states = [st for _, req in group for st in req.states]
        outs = policy.propose(states, k)
        for (s, _), proposals in zip(group, _split(outs, [len(req.states) for _, req in group], "policy.propose"),
                                     strict=True):
            s.feed(proposals)
    while True:
        execs = _waiting(searches, ExecBatch)
        if execs:
            batches = [req.requests for _, req in execs]
            flat = executor.run([r for b in batches for r in b])
            for (s, _), part in zip(execs, _split(flat, [len(b) for b in batches], "executor.run"), strict=True):
                s.feed(part)
            continue
        scoring = _waiting(searches, ScoreBatch)
        if scoring:
            if scorer is None:
                raise ValueError(f"search.mode={scoring[0][0].config.mode!r} needs a PPM scorer; none was given")
            score_batches = [req.states for _, req in scoring]
            scores = scorer.score([st for b in score_batches for st in b])
            for (s, _), part in zip(scoring, _split(scores, [len(b) for b in score_batches], "scorer.score"),
                                    strict=True):
                s.feed(part)
            continue
        return len(proposing)


R = TypeVar("R", ProposeRequest, ExecBatch, ScoreBatch)


def _waiting(searches: Sequence[TreeSearch], kind: type[R]) -> list[tuple[TreeSearch, R]]:
    """(search, its request) for every search whose current request is a ``kind``."""
    out = []
    for s in searches:
        req = s.next_request()
        if isinstance(req, kind):
            out.append((s, req))
    return out


def run_search(
    searches: Sequence[TreeSearch],
    policy: Policy,
    executor: Executor,
    scorer: Scorer | None = None,
    on_done: Callable[[TreeSearch], None] | None = None,
) -> None:
    """Run waves until every search is done. Each finished tree's executor states are released and
    ``on_done`` is called once for it, as soon as it finishes (so it can be stored while others go on)."""
    finished: set[int] = set()

    def collect() -> None:
        for i, s in enumerate(searches):
            if s.done and i not in finished:
                finished.add(i)
                executor.release(s.tree_id)
                if on_done is not None:
                    on_done(s)

    collect()
    while run_wave(searches, policy, executor, scorer):
        collect()
    collect()


def run_lanes(
    searches: Sequence[TreeSearch],
    policy: Policy,
    executor: Executor,
    scorer: Scorer | None = None,
    on_done: Callable[[TreeSearch], None] | None = None,
    lanes: int = 8,
) -> None:
    """Run every search on its own, ``lanes`` at a time, each on a thread that answers its requests one by one
    (``run_one``): a search's next step goes to the policy as soon as its last one is executed, instead of
    waiting for the slowest tree of a wave. For a policy that batches concurrent callers itself
    (``concurrent_calls``: the transformers engine's running batch, which ``lanes`` at least as wide as its
    batch keeps full); one that does not would serve the lanes one call at a time. Each tree ends as it would in
    waves (its randomness is its own) wherever the engine's rows do not depend on what they are batched with.
    ``on_done`` is called once per finished search, from one thread at a time. The first error stops the lanes
    not yet started and is raised once the running ones finish."""
    if lanes < 1:
        raise ValueError(f"lanes={lanes!r}: must be >= 1")
    done_lock = threading.Lock()

    def lane(search: TreeSearch) -> None:
        run_one(search, policy, executor, scorer)
        if on_done is not None:
            with done_lock:
                on_done(search)

    with ThreadPoolExecutor(max_workers=min(lanes, max(1, len(searches))), thread_name_prefix="lane") as pool:
        futures = [pool.submit(lane, s) for s in searches]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in finished and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            raise failed.exception()


def answer_request(
    request: Request, policy: Policy, executor: Executor, scorer: Scorer | None = None
) -> list[object]:
    """Serve one tree's request directly (the async / single-tree path)."""
    if isinstance(request, ProposeRequest):
        return list(policy.propose(list(request.states), request.k))
    if isinstance(request, ExecBatch):
        return list(executor.run(list(request.requests)))
    if scorer is None:
        raise ValueError("a ScoreBatch needs a PPM scorer; none was given")
    return list(scorer.score(list(request.states)))


def run_one(search: TreeSearch, policy: Policy, executor: Executor, scorer: Scorer | None = None) -> TreeSearch:
    """Run a single search to the end on its own (no batching across trees); releases its executor states."""
    while (req := search.next_request()) is not None:
        search.feed(answer_request(req, policy, executor, scorer))
    executor.release(search.tree_id)
    return search
