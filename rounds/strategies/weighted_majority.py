"""``weighted_majority``: N sampled chains; each answer's weight is the sum of its solutions' PPM scores.

The vote is ``mcts.answers.vote`` (weighted): a solution with PPM score s adds (s + 1) / 2, so weights lie in
[0, 1] and a score of -1 adds nothing. Answers merge by ``rounds.voting.normalise``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcts.answers import TerminalAnswer, vote
from rounds.strategies.base import Candidate, SolveContext, sample_chains, score_steps
from rounds.voting import normalise


class WeightedMajority:
    name = "weighted_majority"
    needs_ppm = True
    summary = "N sampled chains, answers weighted by the sum of their PPM scores"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        cands = sample_chains(problems, budget, ctx.policy, ctx, "sample")
        scores = score_steps(problems, cands, ctx.scorer, last_only=True)
        return [[Candidate(c.answer, c.steps, s[-1] if s else None, s) for c, s in zip(row, sc, strict=True)]
                for row, sc in zip(cands, scores, strict=True)]

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        terms = [TerminalAnswer(j, c.answer, c.score, "ungraded", len(c.steps))
                 for j, c in enumerate(candidates) if c.score is not None]
        return vote(terms, weighted=True, key=normalise)
