"""Answers out of a searched tree, for test-time search: the best terminal, or a vote over all of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mcts.node import Verdict
from mcts.qvalues import q_value
from mcts.tree import Tree


@dataclass(frozen=True)
class TerminalAnswer:
    node_id: int
    answer: str | None  # None when the model ended without a \boxed{} answer
    q: float
    verdict: Verdict  # 'ungraded' in test-time search
    depth: int


def terminal_answers(tree: Tree) -> list[TerminalAnswer]:
    """Every terminal of ``tree``, best Q first (ties: lower node id, i.e. found earlier)."""
    w = tree.info.prior_weight
    found = [TerminalAnswer(n.id, n.answer, q_value(n, w), n.verdict, n.depth) for n in tree.terminals()]
    found.sort(key=lambda t: (-t.q, t.node_id))
    return found


def best_answer(tree: Tree) -> str | None:
    """The answer of the terminal with the highest Q (None when no terminal holds an answer)."""
    for t in terminal_answers(tree):
        if t.answer is not None:
            return t.answer
    return None


def vote(
    answers: Sequence[TerminalAnswer], weighted: bool = True, key: Callable[[str], str] = str.strip
) -> str | None:
    """Majority answer over terminals. Unweighted: each terminal counts 1. Weighted: each counts
    (Q + 1) / 2, so weights lie in [0, 1] and a Q of -1 adds nothing. Answers are compared by ``key``
    (pass a normaliser, e.g. one built on the grader, to merge '0.5' with '1/2'); ties go to the answer
    whose best terminal comes first in ``answers``. Returns the first-seen spelling of the winner."""
    totals: dict[str, float] = {}
    first: dict[str, str] = {}
    for t in answers:
        if t.answer is None:
            continue
        k = key(t.answer)
        first.setdefault(k, t.answer)
        totals[k] = totals.get(k, 0.0) + ((t.q + 1.0) / 2.0 if weighted else 1.0)
    if not totals:
        return None
    # max() keeps the first of equal maxima, and dicts iterate in insertion (= first appearance) order.
    best = max(totals, key=totals.__getitem__)
    return first[best]
