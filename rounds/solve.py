"""Solve problems with a registered test-time strategy and grade the answers: the rows of results.parquet.

    rows = solve(problems, "beam", 8, ctx, meter=meter, grade=data.grade, verifier=Verifier(pool))

Problems go in batches of ``batch`` (one strategy call each, so the policy still batches across problems);
each batch's wall time is shared evenly by its problems (``wall_s``). ``meter`` (a ``TokenMeter`` wrapping the
context's policies) supplies the generated tokens per problem. With a ``verifier``, each candidate is checked
before ``select``; failures are dropped, unless every candidate of a problem failed (then all are ranked, so
the filter never leaves a problem with no answer: ``verify_fallback``). The rows record how many wrong and
how many right candidates the filter removed, graded against the reference where there is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from mcts.protocols import Grader
from rounds.strategies import AUTO, STRATEGIES, get_strategy
from rounds.strategies.auto import ChoiceTable, difficulty_bin, probe
from rounds.strategies.base import Candidate, SolveContext, TokenMeter
from rounds.strategies.verify import Verifier

COLUMNS = ("problem_id", "strategy", "budget", "answer", "correct", "tokens", "wall_s", "candidates",
           "verified", "verify_removed_wrong", "verify_removed_right", "verify_fallback", "chosen", "difficulty")


def has_reference(problem: object) -> bool:
    ref = getattr(problem, "answer", None)
    return ref is not None and str(ref).strip() != ""


def check_budget(budget: object) -> int:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget {budget!r}: must be an integer >= 1 (generations per problem)")
    return budget


def parse_spec(spec: str) -> tuple[str, int]:
    """'beam@8' -> ('beam', 8): a registered strategy at a budget (eval.strategies entries)."""
    name, sep, budget = str(spec).partition("@")
    if not sep or not budget.strip().isdigit():
        raise ValueError(f"strategy spec {spec!r}: write NAME@BUDGET, e.g. beam@8")
    get_strategy(name.strip())
    return name.strip(), check_budget(int(budget))


def solve(problems: Sequence[object], strategy: str, budget: int, ctx: SolveContext, *,
          meter: TokenMeter | None = None, grade: Grader | None = None, verifier: Verifier | None = None,
          choices: ChoiceTable | None = None, batch: int = 8,
          on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One row per problem (``COLUMNS``), in problem order. ``strategy`` may be 'auto' (needs ``choices``)."""
    check_budget(budget)
    if strategy == AUTO:
        if choices is None:
            raise ValueError("strategy 'auto' needs a choice table (--choices FILE or --calibration FILE)")
    else:
        s = get_strategy(strategy)
        if s.needs_ppm and ctx.scorer is None:
            raise ValueError(f"strategy {strategy!r} needs a PPM; give --ppm MODEL or a run round with a PPM")
    rows: list[dict[str, Any]] = []
    for start in range(0, len(problems), batch):
        chunk = list(problems[start:start + batch])
        t0 = time.perf_counter()
        if strategy == AUTO:
            part = _auto(chunk, budget, ctx, choices, grade, verifier)  # type: ignore[arg-type]
        else:
            part = _run(chunk, strategy, budget, ctx, grade, verifier)
        share = (time.perf_counter() - t0) / len(chunk)
        for p, row in zip(chunk, part, strict=True):
            row.update(problem_id=str(p.id), budget=budget, wall_s=round(share, 4),  # type: ignore[attr-defined]
                       tokens=meter.take(str(p.id)) if meter is not None else 0)  # type: ignore[attr-defined]
            row.setdefault("strategy", strategy)
            rows.append({c: row.get(c) for c in COLUMNS})
        if on_batch is not None:
            on_batch(len(chunk))
    return rows


def _run(problems: list, name: str, budget: int, ctx: SolveContext, grade: Grader | None,
         verifier: Verifier | None) -> list[dict[str, Any]]:
    strategy = STRATEGIES[name]
    cands = strategy.generate(problems, budget, ctx)
    verdicts = verifier.verify(problems, cands) if verifier is not None else None
    out = []
    for i, (p, row) in enumerate(zip(problems, cands, strict=True)):
        rec: dict[str, Any] = {"strategy": name, "candidates": len(row)}
        pool: Sequence[Candidate] = row
        if verdicts is not None:
            passed = [c for c, v in zip(row, verdicts[i], strict=True) if v.ok]
            failed = [c for c, v in zip(row, verdicts[i], strict=True) if not v.ok]
            rec["verified"] = len(passed)
            rec["verify_fallback"] = not passed and bool(row)
            pool = passed or row
            if has_reference(p) and grade is not None:
                wrong = sum(1 for c in failed if not grade(p, c.answer))
                rec["verify_removed_wrong"], rec["verify_removed_right"] = wrong, len(failed) - wrong
        answer = strategy.select(pool, ctx)
        rec["answer"] = answer
        rec["correct"] = bool(grade(p, answer)) if grade is not None and has_reference(p) else None
        out.append(rec)
    return out


def _auto(problems: list, budget: int, ctx: SolveContext, choices: ChoiceTable, grade: Grader | None,
          verifier: Verifier | None) -> list[dict[str, Any]]:
    """Probe each problem's difficulty, then run the strategy its bin's row chooses at ``budget``; problems that
    chose the same strategy run together. A PPM strategy chosen without a PPM falls back to majority."""
    agreement = probe(problems, choices.probe_k, ctx)
    picks = []
    for a in agreement:
        name = choices.pick(difficulty_bin(a), budget)
        picks.append(name if not (STRATEGIES[name].needs_ppm and ctx.scorer is None) else "majority")
    out: list[dict[str, Any] | None] = [None] * len(problems)
    for name in dict.fromkeys(picks):
        idx = [i for i, n in enumerate(picks) if n == name]
        for i, rec in zip(idx, _run([problems[i] for i in idx], name, budget, ctx, grade, verifier), strict=True):
            rec.update(strategy=AUTO, chosen=name, difficulty=difficulty_bin(agreement[i]))
            out[i] = rec
    return out  # type: ignore[return-value]


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (strategy, budget), in first-seen order: correct / graded, answered, mean tokens, wall."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], int(r["budget"])), []).append(r)
    out = []
    for (name, budget), rs in groups.items():
        graded = [r for r in rs if r["correct"] is not None]
        line = {"strategy": name, "budget": budget, "problems": len(rs), "graded": len(graded),
                "correct": sum(bool(r["correct"]) for r in graded),
                "answered": sum(r["answer"] is not None for r in rs),
                "tokens_mean": sum(int(r["tokens"]) for r in rs) / len(rs),
                "wall_s": sum(float(r["wall_s"]) for r in rs)}
        line["accuracy"] = line["correct"] / len(graded) if graded else None
        if any(r.get("verified") is not None for r in rs):
            line["removed_wrong"] = sum(int(r.get("verify_removed_wrong") or 0) for r in rs)
            line["removed_right"] = sum(int(r.get("verify_removed_right") or 0) for r in rs)
        out.append(line)
    return out


def format_summary(lines: Sequence[dict[str, Any]]) -> str:
    head = f"{'strategy':18s} {'budget':>6s} {'accuracy':>16s} {'answered':>8s} {'tokens/prob':>11s} {'wall s':>8s}"
    verify = any("removed_wrong" in ln for ln in lines)
    if verify:
        head += f" {'rm wrong':>8s} {'rm right':>8s}"
    out = [head]
    for ln in lines:
        acc = "-" if ln["accuracy"] is None else f"{ln['correct']}/{ln['graded']} ({100 * ln['accuracy']:.1f}%)"
        text = (f"{ln['strategy']:18s} {ln['budget']:6d} {acc:>16s} {ln['answered']:8d} {ln['tokens_mean']:11.1f} "
                f"{ln['wall_s']:8.1f}")
        if verify:
            text += f" {ln.get('removed_wrong', 0):8d} {ln.get('removed_right', 0):8d}"
        out.append(text)
    return "\n".join(out)
