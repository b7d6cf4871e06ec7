"""Search and extraction settings: every tunable number of ``mcts`` in two frozen dataclasses.

The pipeline composes ``SearchConfig`` into the run config (``search:`` in YAML) and derives each round's
copy with ``dataclasses.replace(cfg.search, rollouts=..., children=..., mode=...)`` from the round
schedule; ``__post_init__`` re-validates every copy. Messages name the field without the section prefix
("rollouts=0: must be >= 1"); the config loader adds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# terminal:  terminal-guided Q (rounds 1-2): reward +1 / -1 from the grader, backed up to the root.
# ppm:       PPM-augmented Q (rounds 3-4): as terminal, and every new node's Q starts at its PPM score.
# test_time: no reference answer: PPM-initialised Q, and a terminal's reward is its own PPM score.
SearchMode = Literal["terminal", "ppm", "test_time"]

# How UCT scores a child with no visits (and no PPM prior): rStar-Math scores it 0, so a visited sibling
# with a positive UCT value is preferred and high-Q branches are explored first ("zero", the default);
# "inf" is classic UCT, where every child is tried once before any is revisited.
Unvisited = Literal["zero", "inf"]


@dataclass(frozen=True)
class ExtractConfig:
    """What is taken from a finished tree (``mcts.extract``)."""

    sft_top_n: int = 2  # correct trajectories per problem for policy SFT, best mean step Q first
    pair_top_k: int = 2  # positives (top by Q) and negatives (bottom by Q) per shared prefix
    # A step pair is kept only when Q(chosen) - Q(rejected) >= min_margin: correct- and wrong-leading
    # siblings whose Q barely differ carry little signal and mostly teach the PPM noise.
    min_margin: float = 0.1
    final_pairs: bool = True  # also whole-trajectory pairs (top correct vs bottom wrong by mean Q)

    def __post_init__(self) -> None:
        if self.sft_top_n < 0:
            raise ValueError(f"sft_top_n={self.sft_top_n}: must be >= 0 (0 = no SFT rows)")
        if self.pair_top_k < 1:
            raise ValueError(f"pair_top_k={self.pair_top_k}: must be >= 1")
        if not (0.0 <= self.min_margin <= 2.0) or math.isnan(self.min_margin):
            raise ValueError(f"min_margin={self.min_margin}: must be in [0, 2] (Q-values lie in [-1, 1])")


@dataclass(frozen=True)
class SearchConfig:
    """One tree's MCTS. Defaults are rStar-Math's (c = 2, depth 16, two failed expansions = dead end)."""

    mode: SearchMode = "terminal"
    rollouts: int = 16  # rollouts per tree; each selects from the root and expands down to a terminal
    children: int = 8  # k: candidates the policy proposes per expansion
    c_puct: float = 2.0  # UCT exploration constant c in Q(s) + c * sqrt(ln N(parent) / N(s))
    unvisited: Unvisited = "zero"
    max_depth: int = 16  # steps on a path; a non-final step at this depth is a dead end (reward -1)
    # Expansions of one node in a row that kept no candidate (all failed to parse or execute) before
    # the node is a dead end with reward -1; until then it is retried by later rollouts.
    max_consecutive_errors: int = 2
    # PPM modes: a new node starts with Q = its PPM score, worth this many visits. Q = (W + w*p) / (N + w):
    # w = 1 is rStar-Math's one visit; larger w trusts the PPM longer against rollout outcomes.
    prior_weight: float = 1.0
    # A non-final step without code (comments only) is rejected like failing code (``mcts.expand``): steps
    # must be code-augmented. False accepts prose-only steps.
    require_code: bool = True
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("terminal", "ppm", "test_time"):
            raise ValueError(f"mode={self.mode!r}: must be one of 'terminal', 'ppm', 'test_time'")
        if self.unvisited not in ("zero", "inf"):
            raise ValueError(f"unvisited={self.unvisited!r}: must be 'zero' (rStar-Math) or 'inf' (classic UCT)")
        for name in ("rollouts", "children", "max_depth", "max_consecutive_errors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not (self.c_puct >= 0.0) or math.isinf(self.c_puct):
            raise ValueError(f"c_puct={self.c_puct}: must be a finite number >= 0")
        if not (self.prior_weight > 0.0) or math.isinf(self.prior_weight):
            raise ValueError(f"prior_weight={self.prior_weight}: must be a finite number > 0")

    @property
    def uses_scorer(self) -> bool:
        """Whether new nodes are scored by the PPM (so a Scorer must be supplied)."""
        return self.mode != "terminal"
