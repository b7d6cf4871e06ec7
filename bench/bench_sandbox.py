"""Sandbox benchmark: issue 4's three figures, measured side by side in one run, printed as one table.

    .venv/bin/python bench/bench_sandbox.py            # about a minute on 2 cores
    .venv/bin/python bench/bench_sandbox.py --quick    # fewer repeats

1. A warm small step (forked from its parent's live state) vs. a fresh ``python -c`` that imports sympy,
   interleaved; and a fresh step (a new isolated cell, a tree's first step) against the same.
2. An 8-step trajectory executed incrementally (each step forks from its parent's state) vs. replayed from
   scratch at every step (rStar-Math: step n re-executes steps 1..n), for cheap and for sympy-heavy steps.
   Both run in the same pool; the replay path is the pool's own rebuild-on-miss.
3. Throughput: trivial steps per second through a pool of ``--workers`` workers (children of one state).
Ratios only mean something within one run: the machine is shared and timings drift between runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcts.protocols import ExecRequest  # noqa: E402
from pipeline.sandbox import SandboxConfig, SandboxPool  # noqa: E402

CHEAP = [f"x{i} = {'x' + str(i - 1) if i else 1} * 3 + {i}\nprint(x{i})" for i in range(8)]
HEAVY = ["import sympy as sp\nx = sp.symbols('x')"] + [
    f"e{i} = sp.factor(sp.expand((x + {i}) ** 10 * (x - {i}) ** 6))\nr{i} = sp.solve(sp.diff(e{i}, x, 3), x)\n"
    f"print(len(r{i}))"
    for i in range(1, 8)
]


def fresh_python() -> float:
    """Seconds of one ``python -c`` importing sympy and running the small step."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sympy\nx = 2 + 3\nprint(x)"], check=True, capture_output=True)
    return time.perf_counter() - t


def warm_vs_cold(pool: SandboxPool, rounds: int, per_round: int) -> tuple[float, float, float]:
    """Mean seconds of (cold python -c, warm step forked from a live parent, fresh step in a new cell).

    Interleaved round by round, so that the machine's load, which swings by 3x here, hits all three alike.
    The warm step is the search's common path; the fresh one starts a new cell (namespaces, its own /tmp
    and /proc, seccomp, Landlock) as a tree's first step or a rebuild does.
    """
    pool.run([ExecRequest("warm", "root", None, (), "import sympy\na = 2")])
    cold, warm, fresh = [], [], []
    for k in range(rounds):
        cold.append(fresh_python())
        for i in range(per_round):
            t = time.perf_counter()
            [r] = pool.run([ExecRequest("warm", f"c{k}-{i}", "root", ("import sympy\na = 2",), "x = a + 3\nprint(x)")])
            warm.append(time.perf_counter() - t)
            assert r.ok and r.replayed == 0, r
        for _ in range(2):
            t = time.perf_counter()
            r = pool.run_code("x = 2 + 3\nprint(x)")
            fresh.append(time.perf_counter() - t)
            assert r.ok, r
    pool.release("warm")
    return statistics.mean(cold), statistics.mean(warm), statistics.mean(fresh)


def trajectory(pool: SandboxPool, codes: list[str], tree: str, incremental: bool) -> float:
    """Seconds to execute the steps one after another, as a search descending one path would."""
    t = time.perf_counter()
    for i, code in enumerate(codes):
        # Replay: the parent key names no live state, so every step rebuilds steps 0..i-1 from scratch.
        parent = (f"s{i - 1}" if incremental else "absent") if i else None
        [r] = pool.run([ExecRequest(tree, f"s{i}", parent, tuple(codes[:i]), code)])
        assert r.ok and r.replayed == (0 if incremental else i), r
    elapsed = time.perf_counter() - t
    pool.release(tree)
    return elapsed


def trajectories(pool: SandboxPool, codes: list[str], repeats: int) -> tuple[float, float]:
    inc, rep = [], []
    for k in range(repeats):  # interleaved so drift in machine load hits both alike
        inc.append(trajectory(pool, codes, f"inc{k}", incremental=True))
        rep.append(trajectory(pool, codes, f"rep{k}", incremental=False))
    return statistics.mean(inc), statistics.mean(rep)


def throughput(pool: SandboxPool, n: int) -> float:
    pool.run([ExecRequest("tp", "root", None, (), "a = 1")])
    t = time.perf_counter()
    futures = [pool.submit(ExecRequest("tp", f"c{i}", "root", ("a = 1",), "b = a + 1")) for i in range(n)]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - t
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    pool.release("tp")
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    q = args.quick
    rows = []
    with SandboxPool(SandboxConfig(workers=args.workers, timeout=30.0)) as pool:
        cold, warm, fresh = warm_vs_cold(pool, 5 if q else 10, 10 if q else 20)
        rows.append(
            (
                "small step: fresh python -c (sympy) vs warm fork",
                f"{cold * 1e3:.0f} ms",
                f"{warm * 1e3:.2f} ms",
                cold / warm,
            )
        )
        rows.append(
            (
                "fresh step: python -c (sympy) vs a new sandbox cell",
                f"{cold * 1e3:.0f} ms",
                f"{fresh * 1e3:.2f} ms",
                cold / fresh,
            )
        )
        for label, codes, reps in (("cheap", CHEAP, 5 if q else 20), ("sympy-heavy", HEAVY, 1 if q else 3)):
            inc, rep = trajectories(pool, codes, reps)
            rows.append(
                (
                    f"8-step trajectory, {label}: replay vs incremental",
                    f"{rep * 1e3:.0f} ms",
                    f"{inc * 1e3:.0f} ms",
                    rep / inc,
                )
            )
        tput = throughput(pool, 300 if q else 1000)
        stats = pool.stats()
    print(f"\n{'figure':<56} {'baseline':>10} {'sandbox':>10} {'ratio':>8}")
    for name, base, ours, ratio in rows:
        print(f"{name:<56} {base:>10} {ours:>10} {ratio:>7.1f}x")
    print(f"{f'throughput, trivial steps, {args.workers} workers':<56} {'':>10} {tput:>8.0f}/s")
    print(f"\npool counters: {stats}")


if __name__ == "__main__":
    main()
