"""``dvts``: diverse verifier tree search (search-and-learn): N // M independent subtrees, each beam-searched.

The root is expanded into N // M first steps; each distinct one that executes roots its own subtree, so
subtrees are disjoint from the first step on. Each subtree then keeps its single best beam by PPM and expands
it into M steps per depth (N steps per depth in all) until it completes a solution. The highest-scored
complete solution across subtrees wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from rounds.strategies.base import Candidate, SolveContext, best_by_score
from rounds.strategies.beam import beam_shape
from rounds.strategies.stepwise import step_search


class Dvts:
    name = "dvts"
    needs_ppm = True
    summary = "N/M independent subtrees (distinct first steps), each a width-1 PPM beam expanding M"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        subtrees, m = beam_shape(budget, ctx.expansion)
        return step_search(problems, ctx, root_width=subtrees, width=m, keep=1, stop_after=1, split_root=True,
                           tag="dvts")

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return best_by_score(candidates)
