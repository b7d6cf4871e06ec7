"""The search's own overhead per expansion, for trees of 10^2 .. 10^5 nodes.

    .venv/bin/python bench/bench_mcts.py [--sizes 100 1000 10000 100000] [--window 300] [--children 4]

One tree grows under an instant fake policy (k distinct one-step candidates, ~10% of them final answers)
and an instant executor. When the tree first reaches each size, the next ``--window`` expansions are timed,
counting only the search's own calls (``next_request`` / ``feed``: selection, parsing, merging, node
creation, backup, closing, rendering the prompt history), never the fakes. The figure must stay flat (or
grow at most with log of the tree size, through the depth of the selected paths): per-node child lists
and upward-only bookkeeping mean no rollout scans the tree. Printed as microseconds per expansion and as
ratios to the smallest size, all measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcts.config import SearchConfig  # noqa: E402
from mcts.protocols import Proposal  # noqa: E402
from mcts.search import ExecBatch, ProposeRequest, TreeSearch  # noqa: E402
from mcts.steps import ANSWER_END, STEP_END  # noqa: E402


@dataclass(frozen=True)
class _Problem:
    id: str = "bench"
    question: str = "How many?"
    answer: str = "7"


@dataclass(frozen=True)
class _Ok:
    ok: bool = True
    error: str | None = None
    stdout: str = ""


class _InstantPolicy:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.n = 0

    def proposals(self, k: int) -> list[Proposal]:
        out = []
        for _ in range(k):
            self.n += 1
            if self.rng.random() < 0.1:
                out.append(Proposal(f"# so the answer is \\boxed{{{self.n % 9}}}", ANSWER_END))
            else:
                out.append(Proposal(f"# step {self.n}\nx{self.n % 7} = {self.n}", STEP_END))
        return out


def _grade(problem: object, answer: str | None) -> bool:
    return answer == "7"


def measure(sizes: list[int], window: int, children: int, seed: int = 0) -> list[tuple[int, float, float, int]]:
    """(size, median µs per expansion, mean µs, mean depth expanded) for each size, from one growing tree."""
    cfg = SearchConfig(rollouts=10**9, children=children, max_depth=16)
    search = TreeSearch(_Problem(), cfg, seed=seed, grader=_grade)
    policy = _InstantPolicy(seed)
    ok = _Ok()
    results = []
    pending = sorted(sizes)
    timings: list[float] = []
    depths: list[int] = []
    measuring = False
    while pending:
        if not measuring and len(search.tree) >= pending[0]:
            measuring, timings, depths = True, [], []
        t0 = time.perf_counter()
        req = search.next_request()
        spent = time.perf_counter() - t0
        if not isinstance(req, ProposeRequest):
            raise RuntimeError(f"the bench tree closed at {len(search.tree)} nodes; raise --children")
        history = req.states[0].history
        depth = history.count(STEP_END) + history.count(ANSWER_END)
        proposals = policy.proposals(req.k)  # the fake's work: not timed
        t0 = time.perf_counter()
        search.feed([proposals])
        req = search.next_request()
        spent += time.perf_counter() - t0
        while isinstance(req, ExecBatch):  # one batch per chain level (one level here: one-step proposals)
            outcomes = [ok] * len(req.requests)
            t0 = time.perf_counter()
            search.feed(outcomes)
            req = search.next_request()
            spent += time.perf_counter() - t0
        if measuring:
            timings.append(spent)
            depths.append(depth)
            if len(timings) == window:
                us = [t * 1e6 for t in timings]
                results.append((pending.pop(0), statistics.median(us), statistics.fmean(us), round(statistics.fmean(depths))))
                measuring = False
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000, 100_000])
    ap.add_argument("--window", type=int, default=300, help="expansions timed at each size")
    ap.add_argument("--children", type=int, default=4, help="k candidates per expansion")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = measure(args.sizes, args.window, args.children)
    base = rows[0][1]
    print(f"search overhead per expansion (k={args.children}, policy and executor excluded), one run")
    print(f"{'tree nodes':>10}  {'median us':>10}  {'mean us':>9}  {'ratio':>6}  {'depth':>5}")
    for size, med, mean, depth in rows:
        print(f"{size:>10}  {med:>10.1f}  {mean:>9.1f}  {med / base:>6.2f}  {depth:>5}")
    print(f"(total {time.perf_counter() - t0:.1f} s; ratio = median / median at {rows[0][0]} nodes)")


if __name__ == "__main__":
    main()
