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

from mcts.behaviours import check_behaviours
from mcts.node import SearchMode

# How UCT scores a child with no visits (and no PPM prior): rStar-Math scores it 0, so a visited sibling
# with a positive UCT value is preferred and high-Q branches are explored first ("zero", the default);
# "inf" is classic UCT, where every child is tried once before any is revisited.
Unvisited = Literal["zero", "inf"]

# Where a dead end's reward is recorded (see SearchConfig.dead_end_backup).
DeadEndBackup = Literal["node", "path"]


@dataclass(frozen=True)
class ExtractConfig:
    """What is taken from a finished tree (``mcts.extract``). Defaults are rStar-Math's released rules:
    pair selection from ``extra_rm_file.py`` (``search_all_traces``), pair filters from
    ``train/sample_rm_data.py`` (branch ``rStar-math`` of microsoft/rStar)."""

    sft_top_n: int = 2  # correct trajectories per problem for policy SFT, best mean step Q first
    pair_top_k: int = 2  # positives (top by Q) and negatives (bottom by Q) per shared prefix
    # When one side has a single candidate, the other side widens to this many (rStar: 4), so a node with one
    # correct-leading child still yields up to 4 pairs.
    pair_widen_k: int = 4
    # A pair is kept only when Q(chosen) - Q(rejected) >= min_margin (rStar: 0.5): siblings whose Q barely
    # differ carry little signal and mostly teach the PPM noise.
    min_margin: float = 0.5
    # ... and when the two rendered steps are at least this many characters apart by Levenshtein distance
    # (rStar: 20), so near-identical steps (``\boxed{7}`` vs ``\boxed{8}``) never become a pair. 0 = off.
    min_edit_distance: int = 20
    final_pairs: bool = True  # also whole-trajectory pairs (top correct vs bottom wrong by mean Q)
    # Behaviour-aware SFT selection, off when empty: among a problem's correct trajectories those showing any of
    # these behaviours (mcts.behaviours) are picked first, best mean Q first within each group.
    prefer_behaviours: tuple[str, ...] = ()
    # Priming (Gandhi et al. 2025): a .jsonl of {"question", "completion"} trajectories in the step format added to
    # round 1's SFT rows by the export, keeping those that show one of priming_behaviours. '' = off.
    priming_file: str = ""
    priming_behaviours: tuple[str, ...] = ("verification", "backtracking")

    def __post_init__(self) -> None:
        if self.sft_top_n < 0:
            raise ValueError(f"sft_top_n={self.sft_top_n}: must be >= 0 (0 = no SFT rows)")
        if self.pair_top_k < 1:
            raise ValueError(f"pair_top_k={self.pair_top_k}: must be >= 1")
        if self.pair_widen_k < self.pair_top_k:
            raise ValueError(f"pair_widen_k={self.pair_widen_k}: must be >= pair_top_k={self.pair_top_k}")
        if not (0.0 <= self.min_margin <= 2.0) or math.isnan(self.min_margin):
            raise ValueError(f"min_margin={self.min_margin}: must be in [0, 2] (Q-values lie in [-1, 1])")
        if self.min_edit_distance < 0:
            raise ValueError(f"min_edit_distance={self.min_edit_distance}: must be >= 0 (0 = no filter)")
        check_behaviours(self.prefer_behaviours, "prefer_behaviours")
        check_behaviours(self.priming_behaviours, "priming_behaviours")
        if self.priming_file and not self.priming_behaviours:
            raise ValueError("priming_behaviours=[]: priming keeps trajectories showing one of them; name at least one")


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
    # Where a dead end's -1 goes. "node" (rStar-Math, ``MCTS.create_child`` / ``eval_final_answer`` in
    # rstar_deepthink/agents/mcts.py: ``node.update``, not ``update_recursive``): the dead node only, so the
    # root's W is the sum of the terminals' W. "path": every ancestor too (this project's earlier rule: it
    # steers UCT away from branches whose code keeps failing, at the price of Q no longer meaning P(correct)).
    dead_end_backup: DeadEndBackup = "node"
    # PPM modes: also give terminals and dead ends a PPM prior mixed into their Q (the project's earlier rule,
    # which lets the PPM temper a lucky answer). rStar-Math (rstar_deepthink/agents/mcts.py,
    # ``select_next_step`` skips terminals when sampling) scores only non-terminal nodes: a graded terminal's
    # Q is exactly +1 or -1, a dead end's -1.
    prior_on_closed: bool = False
    # A non-final step without code (comments only) is rejected like failing code (``mcts.expand``): steps
    # must be code-augmented. False accepts prose-only steps.
    require_code: bool = True
    # Rollouts of one tree in flight at once (``mcts.search``: lockstep, with a virtual loss on the paths already
    # picked). 1 = one rollout after another, rStar-Math's search. More lets a tree send several expansions per
    # policy call, which shortens a phase whose last trees each wait on one expansion at a time.
    parallel_rollouts: int = 1
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("terminal", "ppm", "test_time"):
            raise ValueError(f"mode={self.mode!r}: must be one of 'terminal', 'ppm', 'test_time'")
        if self.unvisited not in ("zero", "inf"):
            raise ValueError(f"unvisited={self.unvisited!r}: must be 'zero' (rStar-Math) or 'inf' (classic UCT)")
        if self.dead_end_backup not in ("node", "path"):
            raise ValueError(f"dead_end_backup={self.dead_end_backup!r}: must be 'node' (rStar-Math) or 'path'")
        for name in ("rollouts", "children", "max_depth", "max_consecutive_errors", "parallel_rollouts"):
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
