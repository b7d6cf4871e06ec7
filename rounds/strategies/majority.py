"""``majority`` (self-consistency): N sampled chains vote; answers grouped by normal form and equivalence."""

from __future__ import annotations

from collections.abc import Sequence

from rounds.strategies.base import Candidate, SolveContext, sample_chains
from rounds.voting import majority_vote


class Majority:
    name = "majority"
    needs_ppm = False
    summary = "N sampled chains, the most frequent answer (ties: first seen)"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        return sample_chains(problems, budget, ctx.policy, ctx, "sample")

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return majority_vote([c.answer for c in candidates], ctx.equivalent).answer
