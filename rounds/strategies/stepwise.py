"""Step-level search with the PPM, the engine of ``beam`` and ``dvts`` (search-and-learn's layout).

Each problem holds *groups* of live beams (partial solutions). One depth = one round of:

1. every live beam asks the policy for ``width`` next steps (all problems, one policy batch per distinct k);
2. each proposal's first step is parsed (``mcts.expand.parse_proposal`` with room 1); identical siblings merge;
3. the steps execute in their parent beam's interpreter state (one executor batch: ``parent_key`` is the
   parent beam's key, so nothing is replayed); a failing step is dropped;
4. the PPM scores every new prefix (one scorer batch); a final step is a completed candidate with that score;
5. per group, the ``keep`` best-scored open children stay live (ties: proposal order); the rest are pruned.

A group stops when it has ``stop_after`` completed candidates or no live beam; the search stops at
``max_depth`` (a non-final step there is a dead end) or when every group has stopped.

The first depth is special: the root is expanded with ``root_width`` proposals, and ``split_root`` makes
each distinct first step its own group (DVTS: independent subtrees, disjoint by construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mcts.expand import parse_proposal
from mcts.protocols import ExecRequest, SearchState
from mcts.qvalues import check_unit
from mcts.seeds import derive_seed
from mcts.steps import Step, render_steps
from mcts.tree import step_key
from rounds.strategies.base import Candidate, SolveContext, StepRec


@dataclass(frozen=True)
class Beam:
    steps: tuple[StepRec, ...]
    key: str | None  # executor state key of the last step (None: the root, a fresh interpreter)
    group: int  # the subtree it belongs to
    score: float | None = None
    scores: tuple[float, ...] = ()


@dataclass
class _Problem:
    pid: str
    question: str
    live: list[Beam]
    done: list[Candidate]
    finished_groups: set[int]
    next_key: int = 0


def step_search(problems: Sequence[object], ctx: SolveContext, *, root_width: int, width: int, keep: int,
                stop_after: int, split_root: bool, tag: str) -> list[list[Candidate]]:
    if ctx.scorer is None:
        raise ValueError(f"strategy {tag!r} ranks steps with the PPM: give a PPM (--ppm, or a run round that "
                         f"trained one)")
    state = [_Problem(str(p.id), str(p.question), [Beam((), None, 0)], [], set()) for p in problems]  # type: ignore[attr-defined]
    for depth in range(ctx.search.max_depth):
        active = [(s, b) for s in state for b in s.live]
        if not active:
            break
        k_of = (lambda b: root_width) if depth == 0 else (lambda b: width)
        children = _expand(active, k_of, ctx, tag, depth)
        _execute(children, ctx, tag)
        _score(children, ctx)
        for s in state:
            _advance(s, [c for c in children if c.problem is s], depth, ctx.search.max_depth, keep, stop_after,
                     split_root and depth == 0)
    for s in state:
        ctx.executor.release(f"{s.pid}#{tag}")
    return [s.done for s in state]


@dataclass
class _Child:
    problem: _Problem
    parent: Beam
    step: Step
    final: bool
    key: str
    stdout: str | None = None  # None: not run yet, or its code failed
    score: float | None = None

    @property
    def steps(self) -> tuple[StepRec, ...]:
        return self.parent.steps + (StepRec(self.step.text, self.step.code, self.stdout or "", self.final),)


def _expand(active: list[tuple[_Problem, Beam]], k_of, ctx: SolveContext, tag: str, depth: int) -> list[_Child]:
    by_k: dict[int, list[tuple[_Problem, Beam, int]]] = {}
    for idx, (s, b) in enumerate(active):
        by_k.setdefault(k_of(b), []).append((s, b, idx))
    children: list[_Child] = []
    for k, group in by_k.items():
        states = [SearchState(f"{s.pid}#{tag}", s.question, _render(b.steps),
                              derive_seed("solve", ctx.seed, tag, s.pid, depth, idx)) for s, b, idx in group]
        outs = ctx.policy.propose(states, k)
        if len(outs) != len(states):
            raise ValueError(f"policy.propose returned {len(outs)} lists for {len(states)} states")
        for (s, b, _), props in zip(group, outs, strict=True):
            seen: set[str] = set()
            for p in props:
                chain = parse_proposal(p, 1, ctx.search.require_code)
                if not chain.steps:
                    continue  # nothing parseable: no step to keep
                step = chain.steps[0]
                key = step_key(step.text, chain.final)
                if key in seen:
                    continue  # an identical sibling: merged, as the tree search merges it
                seen.add(key)
                s.next_key += 1
                children.append(_Child(s, b, step, chain.final, str(s.next_key)))
    return children


def _execute(children: list[_Child], ctx: SolveContext, tag: str) -> None:
    if not children:
        return
    reqs = [ExecRequest(f"{c.problem.pid}#{tag}", c.key, c.parent.key, tuple(r.code for r in c.parent.steps),
                        c.step.code) for c in children]
    outs = ctx.executor.run(reqs)
    if len(outs) != len(reqs):
        raise ValueError(f"executor.run returned {len(outs)} outcomes for {len(reqs)} requests")
    for c, out in zip(children, outs, strict=True):
        c.stdout = out.stdout if out.ok else None


def _score(children: list[_Child], ctx: SolveContext) -> None:
    kept = [c for c in children if c.stdout is not None]
    states = [SearchState(c.problem.pid, c.problem.question, _render(c.steps), 0) for c in kept]
    raw = ctx.scorer.score(states) if states else []  # type: ignore[union-attr]
    if len(raw) != len(states):
        raise ValueError(f"scorer.score returned {len(raw)} scores for {len(states)} states")
    for c, sc in zip(kept, raw, strict=True):
        c.score = check_unit(sc, f"PPM score of a step of {c.problem.pid}")


def _advance(s: _Problem, children: list[_Child], depth: int, max_depth: int, keep: int, stop_after: int,
             split: bool) -> None:
    """Completed candidates out, the ``keep`` best open children of each group live on."""
    groups: dict[int, list[Beam]] = {}
    n_groups = 0
    for c in children:
        if c.stdout is None:
            continue  # the step's code failed: dropped
        if split:  # the root's distinct first steps: one subtree each
            group, n_groups = n_groups, n_groups + 1
        else:
            group = c.parent.group
        if group in s.finished_groups:
            continue
        beam = Beam(c.steps, c.key, group, c.score, c.parent.scores + (c.score,))  # type: ignore[operator]
        if c.final:
            s.done.append(Candidate(c.step.answer, beam.steps, c.score, beam.scores, group))
        elif depth + 1 < max_depth:
            groups.setdefault(group, []).append(beam)
    # A group closes once it holds ``stop_after`` solutions; every solution of this depth counts first.
    for g in {d.group for d in s.done}:
        if sum(1 for d in s.done if d.group == g) >= stop_after:
            s.finished_groups.add(g)
    live: list[Beam] = []
    for group, beams in groups.items():
        if group in s.finished_groups:
            continue
        ranked = sorted(range(len(beams)), key=lambda i: (-beams[i].score, i))  # type: ignore[operator]
        live.extend(beams[i] for i in ranked[:keep])
    s.live = live


def _render(steps: tuple[StepRec, ...]) -> str:
    return render_steps([(r.text, r.stdout, r.final) for r in steps])
