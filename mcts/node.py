"""The records a search tree is made of: kept steps (``Node``) and rejected candidates (``Failure``).

Invariants (kept by ``mcts.tree.Tree``):
- ids are allocated from one per-tree counter shared by nodes and failures, in creation order, so a
  child's id is larger than its parent's and ``children`` is in increasing id order;
- the root is node 0 at depth 0 with no step; a step node at depth d is the d-th step of its path;
- ``visits`` / ``value_sum`` count backed-up outcomes only; a PPM prior is kept apart in ``prior``
  and mixed in by ``mcts.qvalues.q_value`` with the tree's prior weight;
- ``closed`` means no rollout can select the node again: it is terminal, a dead end, or expanded with
  every child closed (``open_children`` counts the children that are not closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# terminal:  terminal-guided Q (rounds 1-2): reward +1 / -1 from the grader, backed up to the root.
# ppm:       PPM-augmented Q (rounds 3-4): as terminal, and every new non-terminal node's Q starts at its PPM score.
# test_time: no reference answer: PPM-initialised Q, and a terminal's reward is its own PPM score.
SearchMode = Literal["terminal", "ppm", "test_time"]

# open:     may still be selected and expanded.
# terminal: a final step (an answer, or the model stopped at <end_of_answer>); its reward was backed up.
# dead:     a dead end (non-final step at max depth, or too many failed expansions); reward -1 backed up.
NodeStatus = Literal["open", "terminal", "dead"]

# A terminal's grade: 'correct' / 'wrong' from the grader, 'ungraded' in test-time search (no reference).
# Non-terminal nodes have verdict ''.
Verdict = Literal["", "correct", "wrong", "ungraded"]

ROOT_ID = 0
NO_PARENT = -1


@dataclass(slots=True)
class Node:
    """One kept step (or the root). Mutable: visits, values, status and children change during search."""

    id: int
    parent: int  # NO_PARENT for the root
    depth: int
    text: str = ""  # the step as the model wrote it (comments + code), '' for the root
    code: str = ""
    stdout: str = ""  # what the code printed in the sandbox, shown to the policy as '# output:' lines
    answer: str | None = None  # \boxed{} content of a final step
    status: NodeStatus = "open"
    verdict: Verdict = ""
    reward: float = 0.0  # the terminal / dead-end reward that was backed up (0 while open)
    visits: int = 0  # N: outcomes backed up through this node
    value_sum: float = 0.0  # W: sum of those outcomes
    prior: float | None = None  # PPM score of the prefix ending at this step (PPM modes only)
    expanded: bool = False  # the policy was asked for candidates here and at least one was kept
    errors: int = 0  # consecutive expansions of this node that kept no candidate
    children: list[int] = field(default_factory=list)
    open_children: int = 0
    closed: bool = False

    @property
    def is_root(self) -> bool:
        return self.parent == NO_PARENT

    @property
    def is_terminal(self) -> bool:
        return self.status == "terminal"


# Where a candidate was rejected: 'parse' (not a valid step), 'exec' (its code raised or timed out),
# 'depth' (steps past max_depth in a multi-step proposal), 'after_answer' (text after the final step).
FailureStage = Literal["parse", "exec", "depth", "after_answer"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A candidate step that was not kept, with the reason; recorded so the tree table shows it."""

    id: int
    parent: int  # the node it would have extended
    depth: int  # the depth it would have had
    text: str  # the raw step text (or the dropped remainder of a proposal)
    stage: FailureStage
    error: str  # the reason, e.g. "no reasoning comment: ..." or "NameError: name 'x' is not defined"
