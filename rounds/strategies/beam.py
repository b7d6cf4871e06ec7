"""``beam``: step-level beam search with the PPM (search-and-learn's ``beam_search``).

Budget N = N candidate steps per depth. With expansion factor M (``SolveContext.expansion``, capped at N):
the root is expanded into N steps, the top ``N // M`` by PPM score are kept, and each kept beam expands into
M steps at the next depth (N again). The search ends once ``N // M`` solutions are complete, or no beam is
left; the highest-scored complete solution wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from rounds.strategies.base import Candidate, SolveContext, best_by_score
from rounds.strategies.stepwise import step_search


def beam_shape(budget: int, expansion: int) -> tuple[int, int]:
    """(beams kept per depth, expansion per beam) for budget N: M = min(expansion, N), keep = N // M."""
    m = min(expansion, budget)
    return max(1, budget // m), m


class Beam:
    name = "beam"
    needs_ppm = True
    summary = "step-level beam search: N steps per depth, keep the top N/M by PPM, each expands into M"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        keep, m = beam_shape(budget, ctx.expansion)
        return step_search(problems, ctx, root_width=budget, width=m, keep=keep, stop_after=keep,
                           split_root=False, tag="beam")

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return best_by_score(candidates)
