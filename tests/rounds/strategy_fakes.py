"""Scripted stand-ins for the strategy tests: a policy from a function, a PPM from a table, an executor that
runs test-written code in per-node namespaces (the real sandbox's per-node states, without the isolation)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mcts.protocols import Proposal, SearchState
from mcts.steps import ANSWER_END, STEP_END
from tests.mcts.mcts_fakes import NamespaceExecutor, Outcome, last_step  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class P:
    id: str
    question: str
    answer: str | None


def step(text: str) -> Proposal:
    return Proposal(text, STEP_END)


def final(text: str) -> Proposal:
    return Proposal(text, ANSWER_END)


def boxed(answer: str) -> Proposal:
    return final(f"# The answer is \\boxed{{{answer}}}")


def index_of(state: SearchState) -> int:
    """The sample number of a chain's tree id ('p1#sample3' -> 3); 0 when there is none."""
    m = re.search(r"#\D*(\d+)$", state.tree_id)
    return int(m.group(1)) if m else 0


class ScriptPolicy:
    """``script(state, k) -> list[Proposal]``; records (tree id, history, k) of every state it is asked."""

    def __init__(self, script: Callable[[SearchState, int], list[Proposal]]):
        self.script = script
        self.asked: list[tuple[str, str, int]] = []

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        self.asked.extend((s.tree_id, s.history, k) for s in states)
        return [self.script(s, k)[:k] for s in states]


class TableScorer:
    """PPM score of a prefix by its last step's text (``default`` for any other); records what it scored."""

    def __init__(self, table: dict[str, float], default: float = 0.0):
        self.table = table
        self.default = default
        self.scored: list[str] = []

    def score(self, states: Sequence[SearchState]) -> list[float]:
        self.scored.extend(last_step(s.history) for s in states)
        return [self.table.get(last_step(s.history), self.default) for s in states]
