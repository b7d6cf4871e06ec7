"""Held-out evaluation of one round: greedy pass@1, maj@k, PPM best-of-N and PPM-guided MCTS.

    result = evaluate(problems, round_index=2, greedy=greedy_policy, sampler=sampling_policy,
                      executor=sandbox, grade=data.grade, equivalent=data.is_equivalent, scorer=ppm,
                      params=EvalConfig(maj_k=8, best_of_n=8, mcts_rollouts=8, mcts_children=4),
                      train_solved=TrainSolved(solved=37, problems=50), out_dir=run_dir / "round_2")

Every solution is produced by the MCTS engine itself (``mcts.search.TreeSearch`` driven by
``mcts.wave.run_search``), so evaluation sees exactly what the search sees: steps executed in the sandbox
in their parent's state, printed output rendered into the history, the same parsing and depth limit.

- **A chain** (greedy pass@1, and each maj@k / best-of-N sample) is a search with k = 1 child and one
  rollout in terminal mode: one step per expansion down to an answer, a dead end, or the first expansion
  whose step fails (then the chain has no answer; a retry would need a second rollout, and greedy decoding
  would only write the same step again). Its terminal is graded by ``grade`` in the tree.
- **maj@k**: k sampled chains per problem; the extracted answers vote (``rounds.voting.majority_vote``,
  grouped by a normal form and ``equivalent``); a chain without an answer does not vote.
- **PPM best-of-N**: the PPM scores each complete sampled solution (question + all its steps, the same
  prefix format as in the search); the answered solution with the highest score is picked. The N samples
  are the first N of the same sampled chains that maj@k uses (both measure i.i.d. samples from the same
  policy, so sharing them halves the generation cost; ``counts.samples`` records how many were drawn).
- **Registry strategies** (``params.strategies``, e.g. ``("beam@8", "dvts@8")``): any strategy of
  ``rounds.strategies`` at a budget, run by ``rounds.solve.solve`` exactly as ``python -m pipeline solve`` runs
  it; results under ``strategies`` in eval.json (a strategy that needs a PPM is skipped without one, with the
  reason).
- **PPM-guided MCTS**: a test-time search per problem (``mcts_rollouts`` rollouts, ``mcts_children``
  children, PPM-initialised Q, each terminal's PPM score backed up) and ``mcts.answers.best_answer``.

Batching: each phase puts every tree of every problem into one ``run_search``, so the policy sees one
batch per wave across the whole eval set (and the PPM one batch per wave in MCTS). With ``chain_lanes`` the
chains run in lanes instead (``mcts.wave.run_lanes``: each chain's next step joins the engine's running batch as
soon as its last one is executed), on an engine that batches concurrent callers. Without a scorer the
two PPM metrics are skipped with a recorded reason, never filled in.

Seeds derive from (run seed, round, phase, problem id, sample index): a rerun evaluates identically (in lanes,
only where the engine's rows do not depend on what they are batched with, e.g. fp32).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from mcts.answers import terminal_answers
from mcts.config import SearchConfig
from mcts.protocols import Executor, Grader, Policy, ProblemLike, Scorer, SearchState
from mcts.qvalues import check_unit
from mcts.search import TreeSearch
from mcts.seeds import derive_seed
from mcts.wave import run_lanes, run_search
from rounds.eval_config import EvalConfig
from rounds.report import EVAL_FILE, write_json_atomic
from rounds.solve import parse_spec, solve
from rounds.strategies import STRATEGIES
from rounds.strategies.base import SolveContext
from rounds.voting import Equivalent, best_scored, majority_vote

METRIC_KEYS = ("greedy_pass1", "maj_at_k", "ppm_best_of_n", "ppm_mcts", "train_solved")
FULL_ONLY_KEYS = ("maj_at_k", "ppm_best_of_n", "ppm_mcts")  # what a greedy-only evaluation skips


class _NoMeter:
    def update(self, n: int = 1, *, solved: int = 0) -> None:
        pass

    def close(self, summary: str | None = None) -> None:
        pass


class Meter(Protocol):
    """A live counter of one metric's problems (``pipeline.console.Bar`` is one)."""

    def update(self, n: int = 1, *, solved: int = 0) -> None: ...

    def close(self, summary: str | None = None) -> None: ...


# (label, problems) -> a Meter for that metric, e.g. ("greedy", 50); None: no live display.
Track = Callable[[str, int], Meter]


@dataclass(frozen=True)
class TrainSolved:
    """The round's own search coverage: training problems with at least one correct rollout."""

    solved: int
    problems: int

    def __post_init__(self) -> None:
        if self.problems < 1:
            raise ValueError(f"train_solved.problems={self.problems}: must be >= 1 (problems searched this round)")
        if not 0 <= self.solved <= self.problems:
            raise ValueError(f"train_solved.solved={self.solved}: must be in [0, problems={self.problems}]")


@dataclass(frozen=True)
class _View:
    """One tree's view of a problem. Each chain gets its own tree id so executor states never collide;
    ``problem`` is the original, which is what ``grade`` sees."""

    id: str
    question: str
    answer: object
    problem: ProblemLike


@dataclass(frozen=True)
class GreedyFrom:
    """Greedy pass@1 as an earlier evaluation of the same policy measured it: its eval.json rows (``id``,
    ``greedy_answer``, ``greedy_correct``) for every problem. Greedy chains depend on the policy alone, so
    ``evaluate`` takes them from here instead of decoding them again."""

    round: int
    problems: list[dict[str, Any]]

    def by_id(self) -> dict[str, dict[str, Any]]:
        """Problem id -> its row, for the rows that hold a greedy result."""
        return {row.get("id"): row for row in self.problems if "greedy_correct" in row}


@dataclass(frozen=True)
class ChainResult:
    answer: str | None  # the \boxed{} answer of the chain's terminal; None: no terminal or no answer
    correct: bool
    solution: str  # the rendered steps root -> terminal; '' when the chain did not finish


def _grade_view(view: ProblemLike, answer: str | None, grade: Grader) -> bool:
    assert isinstance(view, _View), view  # run_chains builds every tree over a _View
    return grade(view.problem, answer)


def _view(problem: ProblemLike, suffix: str, with_reference: bool = True) -> _View:
    return _View(f"{problem.id}#{suffix}", problem.question, problem.answer if with_reference else None, problem)


def run_chains(
    problems: Sequence[ProblemLike],
    samples: int,
    policy: Policy,
    executor: Executor,
    grade: Grader,
    search: SearchConfig,
    seed: int,
    round_index: int,
    phase: str,
    meter: Meter | None = None,
    lanes: int = 0,
) -> list[list[ChainResult]]:
    """``samples`` linear chains per problem, all advanced together; result[i][j] = problem i, chain j.
    ``meter`` counts a problem done when its last chain finishes, solved when one of its chains is correct.
    ``lanes`` > 0: that many chains in flight at once, each on its own (``mcts.wave.run_lanes``; only for a policy
    with ``concurrent_calls``), instead of waves."""
    chain_cfg = replace(search, mode="terminal", rollouts=1, children=1)
    searches = [
        TreeSearch(
            _view(p, f"{phase}{j}"),
            chain_cfg,
            derive_seed("eval", seed, round_index, phase, p.id, j),
            grader=lambda view, answer: _grade_view(view, answer, grade),
            round_index=round_index,
        )
        for p in problems
        for j in range(samples)
    ]
    left = [samples] * len(problems)
    solved = [False] * len(problems)
    where = {id(s): i for i, s in enumerate(searches)}

    def finished(search: TreeSearch) -> None:
        i = where[id(search)] // samples
        left[i] -= 1
        solved[i] = solved[i] or any(t.verdict == "correct" for t in terminal_answers(search.tree))
        if left[i] == 0 and meter is not None:
            meter.update(1, solved=int(solved[i]))

    if lanes and getattr(policy, "concurrent_calls", False):
        run_lanes(searches, policy, executor, on_done=finished, lanes=lanes)
    else:
        run_search(searches, policy, executor, on_done=finished)
    out: list[list[ChainResult]] = []
    for i in range(len(problems)):
        row = []
        for s in searches[i * samples : (i + 1) * samples]:
            terms = terminal_answers(s.tree)  # a chain has at most one terminal
            if terms:
                t = terms[0]
                row.append(ChainResult(t.answer, t.verdict == "correct", s.tree.render_path(t.node_id)))
            else:
                row.append(ChainResult(None, False, ""))
        out.append(row)
    return out


def evaluate(
    problems: Sequence[ProblemLike],
    *,
    round_index: int,
    greedy: Policy,
    sampler: Policy,
    executor: Executor,
    grade: Grader,
    equivalent: Equivalent | None,
    scorer: Scorer | None = None,
    params: EvalConfig = EvalConfig(),
    search: SearchConfig = SearchConfig(),
    seed: int = 0,
    train_solved: TrainSolved | None = None,
    no_ppm_reason: str | None = None,
    no_train_reason: str | None = None,
    greedy_only_reason: str | None = None,
    models: dict[str, str | None] | None = None,
    greedy_from: GreedyFrom | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    track: Track | None = None,
) -> dict[str, Any]:
    """Evaluate one round on held-out ``problems`` (``mcts.protocols.ProblemLike``).

    ``greedy`` decodes greedily; ``sampler`` samples (it is also the MCTS policy). ``search`` supplies the
    search settings the chains and the test-time MCTS share (c_puct, max_depth, unvisited, ...); mode,
    rollouts and children are set here. ``no_ppm_reason`` / ``no_train_reason`` say why ``scorer`` /
    ``train_solved`` are absent (defaults name the round). ``greedy_only_reason``: measure greedy pass@1 only
    and skip the sampled and PPM metrics with this reason (a CPU run's budget). ``models`` (policy and PPM paths)
    is stored in the result, so a later round with the same models can reuse it. ``greedy_from``: greedy pass@1 of
    an earlier evaluation of the same policy, taken instead of measured (``counts.greedy.same_as_round``). Returns the ``eval.json`` content as a dict and
    writes it to ``out_dir/eval.json`` (temp file + rename) when ``out_dir`` is given.
    """
    problems = list(problems)
    if not problems:
        raise ValueError(f"evaluate(round {round_index}): no held-out problems; give at least one "
                         f"(problems.eval_source / the held-out split)")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"evaluate(round {round_index}): duplicate problem ids {dup}; ids must be unique")
    say = log or (lambda _msg: None)
    # run_chains uses lanes only on an engine that batches concurrent callers (``greedy`` shares ``sampler``'s).
    lanes = params.chain_lanes if getattr(sampler, "concurrent_calls", False) else 0
    if params.chain_lanes and not lanes:
        say(f"eval round {round_index}: eval.chain_lanes={params.chain_lanes} has no effect here: "
            f"{type(sampler).__name__} does not batch concurrent callers, so chains advance in waves")

    def meter(label: str) -> Meter:  # one live counter per metric (``track``), or none
        return track(label, len(problems)) if track is not None else _NoMeter()
    n = len(problems)
    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    skipped: dict[str, str] = {}
    metrics: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    counts: dict[str, dict[str, Any]] = {}
    per_problem: list[dict[str, Any]] = [{"id": i, "reference": "" if p.answer is None else str(p.answer)}
                                         for i, p in zip(ids, problems, strict=True)]

    # --- greedy pass@1 ---
    m = meter("greedy")
    if greedy_from is not None:
        answers = _greedy_rows(greedy_from, ids, round_index)
        for row in per_problem:
            row.update(answers[row["id"]])
        correct = sum(row["greedy_correct"] for row in per_problem)
        counts["greedy"] = {"correct": correct, "problems": n,
                            "answered": sum(row["greedy_answer"] is not None for row in per_problem),
                            "same_as_round": greedy_from.round}
        m.close(f"greedy pass@1 {correct}/{n}, round {greedy_from.round}'s (same policy)")
        say(f"eval round {round_index}: greedy pass@1 {correct}/{n}, as round {greedy_from.round} measured it "
            f"(same policy)")
    else:
        t = time.perf_counter()
        greedy_runs = run_chains(problems, 1, greedy, executor, grade, search, seed, round_index, "greedy", m,
                                 lanes=params.chain_lanes)
        wall["greedy"] = time.perf_counter() - t
        correct = 0
        for row, (chain,) in zip(per_problem, greedy_runs, strict=True):
            row.update(greedy_answer=chain.answer, greedy_correct=chain.correct)
            correct += chain.correct
        counts["greedy"] = {"correct": correct, "problems": n,
                            "answered": sum(c[0].answer is not None for c in greedy_runs)}
        m.close(f"greedy pass@1 {correct}/{n}")
        say(f"eval round {round_index}: greedy pass@1 {correct}/{n} ({wall['greedy']:.1f}s)")
    metrics["greedy_pass1"] = correct / n

    if greedy_only_reason is not None:
        for key in FULL_ONLY_KEYS:
            skipped[key] = greedy_only_reason
    else:
        _sampled_metrics(problems, per_problem, metrics, counts, skipped, wall, sampler=sampler, executor=executor,
                         grade=grade, equivalent=equivalent, scorer=scorer, params=params, search=search, seed=seed,
                         round_index=round_index, no_ppm_reason=no_ppm_reason, say=say, meter=meter)

    strategies = _registry_strategies(problems, per_problem, skipped, wall, params, greedy=greedy, sampler=sampler,
                                      executor=executor, grade=grade, equivalent=equivalent, scorer=scorer,
                                      search=search, seed=seed, greedy_only_reason=greedy_only_reason, say=say,
                                      meter=meter)

    if train_solved is None:
        skipped["train_solved"] = no_train_reason or (
            "no training search (round 0 is the base model)" if round_index == 0
            else "the round's rollout stats were not given")
    else:
        metrics["train_solved"] = train_solved.solved / train_solved.problems
        counts["train"] = {"solved": train_solved.solved, "problems": train_solved.problems}

    wall["total"] = time.perf_counter() - t_start
    result: dict[str, Any] = {
        "round": round_index,
        "n_problems": n,
        "metrics": metrics,
        "counts": counts,
        "skipped": skipped,
        "wall_s": {k_: round(v_, 3) for k_, v_ in wall.items()},
        "params": params.budgets(),
        "search": search_record(search),
        "seed": seed,
        "full": greedy_only_reason is None,
        "models": models or {},
        "problems": per_problem,
    }
    if lanes:
        result["chain_lanes"] = lanes  # batched by timing: under bf16 a rerun need not repeat
    if strategies:
        result["strategies"] = strategies
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / EVAL_FILE, result)
    return result


def search_record(search: SearchConfig) -> dict[str, Any]:
    """The search settings an evaluation's chains and MCTS share, as eval.json records them."""
    return {"c_puct": search.c_puct, "max_depth": search.max_depth, "unvisited": search.unvisited,
            "max_consecutive_errors": search.max_consecutive_errors, "prior_weight": search.prior_weight}


def _greedy_rows(greedy_from: GreedyFrom, ids: list[str], round_index: int) -> dict[str, dict[str, Any]]:
    """Problem id -> its greedy answer and verdict from ``greedy_from``, which must cover every id."""
    rows = greedy_from.by_id()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ValueError(f"evaluate(round {round_index}): greedy_from (round {greedy_from.round}) has no greedy "
                         f"result for {len(missing)} of {len(ids)} problems, e.g. {missing[:3]}; evaluate those "
                         f"problems anew (greedy_from=None)")
    return {i: {"greedy_answer": rows[i].get("greedy_answer"), "greedy_correct": bool(rows[i]["greedy_correct"])}
            for i in ids}


def _sampled_metrics(problems: Sequence[ProblemLike], per_problem: list[dict[str, Any]], metrics: dict[str, Any],
                     counts: dict[str, Any], skipped: dict[str, str], wall: dict[str, float], *, sampler: Policy,
                     executor: Executor, grade: Grader, equivalent: Equivalent | None, scorer: Scorer | None,
                     params: EvalConfig, search: SearchConfig, seed: int, round_index: int,
                     no_ppm_reason: str | None, say: Callable[[str], None],
                     meter: Callable[[str], Meter]) -> None:
    """maj@k over sampled chains and, with a scorer, PPM best-of-N over the same samples and PPM-guided MCTS;
    fills ``metrics``, ``counts``, ``skipped``, ``wall`` and the per-problem rows in place."""
    n = len(problems)
    # --- sampled chains: maj@k, and best-of-N when there is a PPM ---
    n_samples = max(params.maj_k, params.best_of_n if scorer is not None else 0)
    t = time.perf_counter()
    m = meter(f"{n_samples} samples")
    sampled = run_chains(problems, n_samples, sampler, executor, grade, search, seed, round_index, "sample", m,
                         lanes=params.chain_lanes)
    wall["samples"] = time.perf_counter() - t
    correct = any_correct = 0
    k = params.maj_k
    for row, chains in zip(per_problem, sampled, strict=True):
        first_k = chains[:k]
        v = majority_vote([c.answer for c in first_k], equivalent)
        # The winner's spelling is its first-seen sample's answer, graded in that sample's tree.
        ok = v.answer is not None and next(c.correct for c in first_k if c.answer == v.answer)
        row.update(maj_answer=v.answer, maj_votes=v.votes, maj_correct=ok)
        correct += ok
        any_correct += any(c.correct for c in first_k)
    metrics["maj_at_k"] = correct / n
    counts["maj"] = {"k": k, "correct": correct, "problems": n,
                     "answered_samples": sum(c.answer is not None for cs in sampled for c in cs[:k]),
                     "pass_at_k": any_correct}
    counts["samples"] = {"per_problem": n_samples, "shared_by": "maj@k and best-of-N"}
    m.close(f"maj@{k} {correct}/{n}, pass@{k} {any_correct}/{n}")
    say(f"eval round {round_index}: maj@{k} {correct}/{n} ({wall['samples']:.1f}s for {n * n_samples} chains)")

    if scorer is None:
        reason = no_ppm_reason or ("no PPM (round 0 is the base model)" if round_index == 0
                                   else "no PPM scorer was given for this round")
        skipped["ppm_best_of_n"] = skipped["ppm_mcts"] = reason
    else:
        t = time.perf_counter()
        counts["best_of_n"] = _best_of_n(problems, per_problem, sampled, params.best_of_n, scorer)
        wall["best_of_n"] = time.perf_counter() - t
        metrics["ppm_best_of_n"] = counts["best_of_n"]["correct"] / n
        say(f"eval round {round_index}: PPM best-of-{params.best_of_n} {counts['best_of_n']['correct']}/{n}")

        t = time.perf_counter()
        m = meter("PPM MCTS")
        counts["mcts"] = _mcts(problems, per_problem, params, sampler, executor, scorer, grade, search, seed,
                               round_index, m)
        m.close(f"PPM MCTS {counts['mcts']['correct']}/{n}")
        wall["mcts"] = time.perf_counter() - t
        metrics["ppm_mcts"] = counts["mcts"]["correct"] / n
        say(f"eval round {round_index}: PPM MCTS {counts['mcts']['correct']}/{n} ({wall['mcts']:.1f}s)")


def _best_of_n(problems: Sequence[ProblemLike], per_problem: list[dict[str, Any]], sampled: list[list[ChainResult]],
               n_best: int, scorer: Scorer) -> dict[str, Any]:
    """Score every complete answered solution among the first N samples in ONE scorer batch, pick the best."""
    states: list[SearchState] = []
    where: list[tuple[int, int]] = []  # (problem index, sample index) of each state
    for i, (p, chains) in enumerate(zip(problems, sampled, strict=True)):
        for j, c in enumerate(chains[:n_best]):
            if c.answer is not None:
                states.append(SearchState(f"{p.id}#sample{j}", p.question, c.solution, 0))
                where.append((i, j))
    raw = scorer.score(states) if states else []
    if len(raw) != len(states):
        raise ValueError(f"scorer.score returned {len(raw)} scores for {len(states)} solutions")
    scores: list[list[float | None]] = [[None] * min(n_best, len(chains)) for chains in sampled]
    for (i, j), s in zip(where, raw, strict=True):
        scores[i][j] = check_unit(s, f"PPM score of problem {per_problem[i]['id']} sample {j}")
    correct = 0
    for row, chains, sc in zip(per_problem, sampled, scores, strict=True):
        pick = best_scored([c.answer for c in chains[:n_best]], sc)
        ok = pick.index is not None and chains[pick.index].correct
        row.update(bon_answer=pick.answer, bon_score=pick.score, bon_correct=ok)
        correct += ok
    return {"n": n_best, "correct": correct, "problems": len(problems), "scored": len(states)}


def _mcts(problems: Sequence[ProblemLike], per_problem: list[dict[str, Any]], params: EvalConfig, sampler: Policy,
          executor: Executor, scorer: Scorer, grade: Grader, search: SearchConfig, seed: int,
          round_index: int, meter: Meter | None = None) -> dict[str, Any]:
    """PPM-guided test-time MCTS per problem (no reference in the search), then grade the best answer."""
    cfg = replace(search, mode="test_time", rollouts=params.mcts_rollouts, children=params.mcts_children)
    searches = [
        # The test-time tree never holds the reference: only the final best answer is graded, outside it.
        TreeSearch(_view(p, "mcts", with_reference=False), cfg, derive_seed("eval", seed, round_index, "mcts", p.id),
                   grader=None, round_index=round_index)
        for p in problems
    ]
    run_search(searches, sampler, executor, scorer, on_done=meter and (lambda _s: meter.update(1)))
    correct = answered = terminals = 0
    for row, p, s in zip(per_problem, problems, searches, strict=True):
        terms = terminal_answers(s.tree)
        terminals += len(terms)
        best = next((t for t in terms if t.answer is not None), None)
        ok = best is not None and grade(p, best.answer)
        row.update(mcts_answer=None if best is None else best.answer, mcts_q=None if best is None else best.q,
                   mcts_correct=ok)
        correct += ok
        answered += best is not None
    return {"rollouts": params.mcts_rollouts, "children": params.mcts_children, "correct": correct,
            "problems": len(problems), "answered": answered, "terminals": terminals}


def _registry_strategies(problems: Sequence[ProblemLike], per_problem: list[dict[str, Any]], skipped: dict[str, str],
                         wall: dict[str, float], params: EvalConfig, *, greedy: Policy, sampler: Policy,
                         executor: Executor, grade: Grader, equivalent: Equivalent | None, scorer: Scorer | None,
                         search: SearchConfig, seed: int, greedy_only_reason: str | None,
                         say: Callable[[str], None], meter: Callable[[str], Meter]) -> dict[str, Any]:
    """``params.strategies`` through the registry (``rounds.solve.solve``): {spec: counts}, answers per problem."""
    out: dict[str, Any] = {}
    ctx = SolveContext(sampler, executor, scorer, greedy, search, seed, mcts_children=params.mcts_children,
                       equivalent=equivalent)
    for spec in params.strategies:
        name, budget = parse_spec(spec)
        if greedy_only_reason is not None:
            skipped[spec] = greedy_only_reason
            continue
        if STRATEGIES[name].needs_ppm and scorer is None:
            skipped[spec] = f"strategy {name!r} needs a PPM; none was given for this round"
            continue
        t = time.perf_counter()
        m = meter(spec)
        rows = solve(problems, name, budget, ctx, grade=grade, batch=max(1, len(problems)))
        wall[spec] = time.perf_counter() - t
        m.update(len(rows), solved=sum(bool(r["correct"]) for r in rows))
        m.close(f"{spec} {sum(bool(r['correct']) for r in rows)}/{len(rows)}")
        for row, r in zip(per_problem, rows, strict=True):
            row[f"{spec}_answer"], row[f"{spec}_correct"] = r["answer"], r["correct"]
        correct = sum(bool(r["correct"]) for r in rows)
        out[spec] = {"strategy": name, "budget": budget, "correct": correct, "problems": len(rows),
                     "answered": sum(r["answer"] is not None for r in rows)}
        say(f"eval: {spec} {correct}/{len(rows)} ({wall[spec]:.1f}s)")
    return out
