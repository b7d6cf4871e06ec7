"""Compute-optimal strategy choice (``--strategy auto --budget B``), after Snell et al.'s test-time scaling:
estimate each problem's difficulty, then use the strategy that did best on problems of that difficulty at
budget B on a calibration split.

Difficulty is the policy's own agreement: ``probe_k`` sampled chains vote (``rounds.voting.majority_vote``);
agreement = winning votes / probe_k (0 when no chain answered). Bins (with probe_k = 4: 4 or 3 agreeing =
easy, 2 = medium, 0-1 = hard):

    easy    agreement >= 0.75
    medium  agreement >= 0.5
    hard    otherwise

The choice table maps bin -> budget -> strategy and is stored as JSON next to the results, so a later solve
uses it without calibrating again (``--choices FILE``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.atomic_io import atomic_write_json
from rounds.strategies.base import SolveContext, sample_chains
from rounds.voting import majority_vote

BINS = ("easy", "medium", "hard")
FALLBACK = "majority"  # a bin the calibration split never saw


def difficulty_bin(agreement: float) -> str:
    if agreement >= 0.75:
        return "easy"
    if agreement >= 0.5:
        return "medium"
    return "hard"


def probe(problems: Sequence[object], k: int, ctx: SolveContext) -> list[float]:
    """Agreement of ``k`` sampled chains per problem (one batch for all problems)."""
    cands = sample_chains(problems, k, ctx.policy, ctx, "probe")
    return [majority_vote([c.answer for c in row], ctx.equivalent).votes / k for row in cands]


@dataclass
class ChoiceTable:
    probe_k: int
    choice: dict[str, dict[int, str]] = field(default_factory=dict)  # bin -> budget -> strategy
    evidence: dict[str, dict[int, dict[str, list[int]]]] = field(default_factory=dict)  # ... -> [correct, n, tokens]

    def pick(self, bin_: str, budget: int) -> str:
        """The strategy for ``bin_`` at ``budget``: the calibrated budget itself, else the largest calibrated
        budget below it, else the smallest above; ``FALLBACK`` for a bin never seen."""
        by_budget = self.choice.get(bin_, {})
        if not by_budget:
            return FALLBACK
        below = [b for b in by_budget if b <= budget]
        return by_budget[max(below) if below else min(by_budget)]

    def to_json(self) -> dict:
        return {"probe_k": self.probe_k,
                "choice": {b: {str(k): v for k, v in d.items()} for b, d in self.choice.items()},
                "evidence": {b: {str(k): v for k, v in d.items()} for b, d in self.evidence.items()}}

    @classmethod
    def from_json(cls, data: dict) -> ChoiceTable:
        return cls(int(data["probe_k"]),
                   {b: {int(k): str(v) for k, v in d.items()} for b, d in data["choice"].items()},
                   {b: {int(k): v for k, v in d.items()} for b, d in data.get("evidence", {}).items()})

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> ChoiceTable:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"choice table {path}: unreadable ({type(e).__name__}: {e}); write one with "
                             f"--calibration FILE") from e


def build_choice_table(rows: Sequence[dict], bins: dict[str, str], probe_k: int,
                       order: Sequence[str]) -> ChoiceTable:
    """From calibration result rows (problem_id, strategy, budget, correct, tokens) and each problem's bin:
    per (bin, budget) the strategy with the most correct answers; ties: fewer tokens, then ``order``."""
    tally: dict[str, dict[int, dict[str, list[int]]]] = {}
    for r in rows:
        if r["correct"] is None:
            continue
        t = tally.setdefault(bins[str(r["problem_id"])], {}).setdefault(int(r["budget"]), {}).setdefault(
            r["strategy"], [0, 0, 0])
        t[0] += bool(r["correct"])
        t[1] += 1
        t[2] += int(r["tokens"])
    table = ChoiceTable(probe_k, evidence=tally)
    rank = {name: i for i, name in enumerate(order)}
    for bin_, by_budget in tally.items():
        for budget, by_strategy in by_budget.items():
            best = min(by_strategy, key=lambda s: (-by_strategy[s][0], by_strategy[s][2], rank.get(s, len(rank))))
            table.choice.setdefault(bin_, {})[budget] = best
    return table
