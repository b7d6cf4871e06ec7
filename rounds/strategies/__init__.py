"""Test-time strategies: one file per strategy, one registry that ``python -m pipeline solve`` and round
evaluation both read, so a strategy added here appears in both.

    from rounds.strategies import get_strategy, STRATEGIES
    s = get_strategy("beam")
    cands = s.generate(problems, budget=8, ctx=SolveContext(policy, executor, scorer))
    answer = s.select(cands[0], ctx)

``auto`` (compute-optimal choice per difficulty bin) is not a registry entry: it picks one of these per
problem (``rounds.strategies.auto``).
"""

from __future__ import annotations

from rounds.strategies.base import Candidate, SolveContext, Strategy
from rounds.strategies.beam import Beam
from rounds.strategies.best_of_n import BestOfN
from rounds.strategies.dvts import Dvts
from rounds.strategies.greedy import Greedy
from rounds.strategies.majority import Majority
from rounds.strategies.mcts import Mcts
from rounds.strategies.weighted_majority import WeightedMajority

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Greedy(), Majority(), WeightedMajority(), BestOfN(), Beam(),
                                                         Dvts(), Mcts())}
AUTO = "auto"


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; a ValueError naming the choices otherwise."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}, {AUTO} "
                         f"(python -m pipeline solve --list-strategies)")
    return STRATEGIES[name]


__all__ = ["AUTO", "STRATEGIES", "Candidate", "SolveContext", "Strategy", "get_strategy"]
