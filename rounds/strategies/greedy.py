"""``greedy``: one chain, decoded greedily. The budget does not buy anything more (pass@1 of the policy)."""

from __future__ import annotations

from collections.abc import Sequence

from rounds.strategies.base import Candidate, SolveContext, sample_chains


class Greedy:
    name = "greedy"
    needs_ppm = False
    summary = "one greedy chain; the budget is ignored"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        return sample_chains(problems, 1, ctx.greedy or ctx.policy, ctx, "greedy")

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return next((c.answer for c in candidates if c.answer is not None), None)
