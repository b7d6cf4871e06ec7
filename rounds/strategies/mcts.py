"""``mcts``: the PPM-guided test-time search of round 4 (``mcts.search`` in test_time mode).

Budget N = N rollouts, ``SolveContext.mcts_children`` candidates per expansion; every terminal is a
candidate scored by its Q, and the best Q wins (``mcts.answers.best_answer``'s rule)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mcts.answers import terminal_answers
from mcts.search import TreeSearch
from mcts.seeds import derive_seed
from mcts.wave import run_search
from rounds.strategies.base import Candidate, SolveContext, _View, best_by_score, steps_of


class Mcts:
    name = "mcts"
    needs_ppm = True
    summary = "PPM-guided MCTS: N rollouts, terminals ranked by Q"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        if ctx.scorer is None:
            raise ValueError("strategy 'mcts' is PPM-guided: give a PPM (--ppm, or a run round that trained one)")
        cfg = replace(ctx.search, mode="test_time", rollouts=budget, children=ctx.mcts_children)
        searches = [TreeSearch(_View(f"{p.id}#mcts", str(p.question)), cfg,  # type: ignore[attr-defined]
                               derive_seed("solve", ctx.seed, "mcts", str(p.id)))  # type: ignore[attr-defined]
                    for p in problems]
        run_search(searches, ctx.policy, ctx.executor, ctx.scorer)
        return [[Candidate(t.answer, steps_of(s.tree.path(t.node_id)), t.q) for t in terminal_answers(s.tree)]
                for s in searches]

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return best_by_score(candidates)
