"""``best_of_n``: N sampled chains; the PPM scores every step prefix, the scores fold into one per solution
('last' / 'min' / 'prod', ``SolveContext.aggregate``), and the highest-scored answered solution wins."""

from __future__ import annotations

from collections.abc import Sequence

from rounds.strategies.base import Candidate, SolveContext, aggregate, best_by_score, sample_chains, score_steps


class BestOfN:
    name = "best_of_n"
    needs_ppm = True
    summary = "N sampled chains ranked by the PPM (step scores folded by --aggregate last|min|prod)"

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]:
        cands = sample_chains(problems, budget, ctx.policy, ctx, "sample")
        scores = score_steps(problems, cands, ctx.scorer, last_only=ctx.aggregate == "last")
        return [[Candidate(c.answer, c.steps, aggregate(s, ctx.aggregate), s) for c, s in zip(row, sc, strict=True)]
                for row, sc in zip(cands, scores, strict=True)]

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None:
        return best_by_score(candidates)
