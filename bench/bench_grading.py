"""How fast is grading, warm? Answers graded per second (batched) and per-answer latency (p50/p99).

    python bench/bench_grading.py [--n 2000] [--workers 2] [--timeout 5]

The workload mixes what rollouts produce: plain numbers (GSM8K-like, decided in-process), LaTeX
and symbolic answers (MATH-500 references when /work/shared/data/benchmarks is present, else a
built-in list; these go to the warm workers), Countdown expressions, and a few adversarial answers
that must hit the wall-clock bound. Everything is measured side by side in this one run, and the
batched pool is compared with grading the same answers serially in this process without any
timeout (the naive way), so the ratios mean something on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

from data import Grader, GradingConfig, Problem, generate_arithmetic, generate_countdown, grade_countdown
from data.equivalence import compare, quick_compare

MATH500 = Path("/work/shared/data/benchmarks/math500-rstar.json")
BUILTIN_LATEX = ["\\frac{14}{3}", "p - q", "3\\sqrt{13}", "\\left( 3, \\frac{\\pi}{2} \\right)", "x^3+3x-6",
                 "\\frac{3\\sqrt{3}}{4}", "(-2,1)", "6 - 5i", "\\cot x", "[1, 2)", "11\\sqrt2", "\\text{Evelyn}"]
ADVERSARIAL = ["10^{10^{10}}", "2^{2^{2^{2^{2^{2}}}}}"]


def workload(n: int, seed: int) -> list[tuple[Problem, str]]:
    rng = random.Random(seed)
    pairs: list[tuple[Problem, str]] = []
    latex = [row["answer"] for row in json.loads(MATH500.read_text())] if MATH500.is_file() else BUILTIN_LATEX
    arithmetic = generate_arithmetic(n, seed=seed)
    countdown = generate_countdown(max(1, n // 10), seed=seed)
    for i in range(n):
        kind = rng.random()
        if kind < 0.55:  # a number, right or off by one, sometimes with units or a currency sign
            p = arithmetic[i]
            answer = p.answer if rng.random() < 0.5 else str(int(eval_fraction(p.answer)) + 1)
            pairs.append((p, rng.choice(["{}", "\\${}", "{} dollars", "\\boxed{{{}}}"]).format(answer)))
        elif kind < 0.9:  # a LaTeX answer against its own or another reference, rewritten a little
            ref = rng.choice(latex)
            pred = ref if rng.random() < 0.5 else rng.choice(latex)
            pred = rng.choice(["{}", "${}$", "\\displaystyle {}"]).format(pred)
            pairs.append((Problem(id=f"m{i}", question="q", answer=ref, source="bench"), pred))
        else:  # a Countdown expression: the stored solution, or a wrong one
            p = countdown[i % len(countdown)]
            pred = p.meta["solution"] if rng.random() < 0.5 else " + ".join(map(str, p.meta["numbers"]))
            pairs.append((p, pred))
    for j, text in enumerate(ADVERSARIAL):
        pairs[len(pairs) // 2 + j] = (Problem(id=f"adv{j}", question="q", answer="1", source="bench"), text)
    return pairs


def eval_fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return int(num) / int(den or 1)


def serial_in_process(pairs: list[tuple[Problem, str]]) -> float:
    """The naive grader: everything in this process, no timeout (the adversarial answers are left out)."""
    start = time.perf_counter()
    for p, pred in pairs:
        if p.kind == "countdown":
            grade_countdown(p, pred)
        else:
            compare(pred, p.answer)
    return time.perf_counter() - start


def rollout_like(grader: Grader, args: argparse.Namespace) -> None:
    """MCTS grades each problem's terminals wave after wave, mostly the same few answers: what the cache buys."""
    rng = random.Random(args.seed + 1)
    latex = [row["answer"] for row in json.loads(MATH500.read_text())] if MATH500.is_file() else BUILTIN_LATEX
    refs = rng.sample(latex, min(50, len(latex)))
    problems, predictions = [], []
    for i, ref in enumerate(refs):
        candidates = [ref, *rng.sample(latex, 3)]  # the right answer and three wrong ones
        for _ in range(16):  # 16 terminals per tree
            problems.append(Problem(id=f"r{i}", question="q", answer=ref, source="bench"))
            predictions.append(f"${rng.choice(candidates)}$")
    with Grader(GradingConfig(workers=args.workers, timeout_s=args.timeout)) as cached:
        warm(cached, args.workers)
        start = time.perf_counter()
        cached.grade_many(problems, predictions)  # distinct pairs computed once within the batch
        first = time.perf_counter() - start
        start = time.perf_counter()
        for p, pred in zip(problems, predictions, strict=True):  # a later wave: one call per terminal
            cached.grade(p, pred)
        again = time.perf_counter() - start
    print(f"rollout-like ({len(refs)} problems x 16 terminals, 4 distinct answers each): first batch "
          f"{len(problems) / first:.1f} answers/s; the same answers again, one call each, from the verdict cache "
          f"{len(problems) / again:.1f} answers/s ({first / again:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="answers in the batched workload")
    parser.add_argument("--latency-n", type=int, default=300, help="answers graded one by one for latency")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="grading.timeout_s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    pairs = workload(args.n, args.seed)
    benign = [(p, s) for p, s in pairs if not p.id.startswith("adv")]
    adversarial = [(p, s) for p, s in pairs if p.id.startswith("adv")]
    slow = sum(1 for p, s in benign if p.kind != "countdown" and quick_compare(s, p.answer) is None)
    print(f"workload: {len(benign)} answers, {slow} of them need the slow tier (math-verify in workers); "
          f"plus {len(adversarial)} adversarial; workers={args.workers}, timeout={args.timeout:g} s")

    # No verdict cache here: every answer is really compared (the cache is measured on its own below).
    with Grader(GradingConfig(workers=args.workers, timeout_s=args.timeout, cache_size=0)) as grader:
        start = time.perf_counter()
        warm(grader, args.workers)
        print(f"cold start ({args.workers} workers importing math-verify): {time.perf_counter() - start:.2f} s")

        start = time.perf_counter()
        grades = grader.grade_many([p for p, _ in benign], [s for _, s in benign])
        batch_s = time.perf_counter() - start
        print(f"batched, warm: {len(benign) / batch_s:8.1f} answers/s  ({batch_s:.2f} s, "
              f"{sum(g.correct for g in grades)} correct)")

        start = time.perf_counter()
        grades = grader.grade_many([p for p, _ in adversarial], [s for _, s in adversarial])
        print(f"adversarial ({', '.join(s for _, s in adversarial)}): {time.perf_counter() - start:.2f} s "
              f"in all, reasons: {sorted({g.reason for g in grades})}")
        warm(grader, args.workers)

        latencies = []
        for p, pred in benign[: args.latency_n]:
            start = time.perf_counter()
            grader.grade_detailed(p, pred)
            latencies.append(time.perf_counter() - start)
        print(f"one at a time, warm: latency p50 {1000 * statistics.median(latencies):.2f} ms, "
              f"p99 {1000 * p99(latencies):.2f} ms, max {1000 * max(latencies):.1f} ms")
        slow_lat = [t for t, (p, s) in zip(latencies, benign, strict=False)
                    if p.kind != "countdown" and quick_compare(s, p.answer) is None]
        if slow_lat:
            print(f"  slow-tier answers only ({len(slow_lat)}): p50 {1000 * statistics.median(slow_lat):.2f} ms, "
                  f"p99 {1000 * p99(slow_lat):.2f} ms")
        rollout_like(grader, args)

    serial_s = serial_in_process(benign)
    print(f"serial in-process, no timeout (naive; it would never finish the adversarial answers): "
          f"{len(benign) / serial_s:8.1f} answers/s")
    print(f"ratio batched pool / naive serial on the same answers: {serial_s / batch_s:.2f}x")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def warm(grader: Grader, workers: int) -> None:
    """Start every worker: a batch of ``workers`` slow-tier answers occupies all of them."""
    p = Problem(id="w", question="q", answer="(x+1)^2", source="bench")
    grader.grade_many([p] * workers, [f"x^2+2x+{1 + i * 0}" + " " * i for i in range(workers)])


if __name__ == "__main__":
    main()
