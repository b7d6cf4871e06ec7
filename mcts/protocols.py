"""The narrow edges of the search: what it asks of a policy, an executor, a scorer and a grader.

``mcts`` imports no Ray, torch, vLLM or transformers. Production plugs in the engines and the
sandbox from ``pipeline``; tests plug in scripted fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class ProblemLike(Protocol):
    """What the search reads of a problem (``data.Problem`` is one; tests use small frozen dataclasses).

    ``id`` is unique within a round and names the tree (a string: seeds derive from it, node tables store it);
    ``answer`` is the reference, read only by the grader (None in a test-time search, which has none)."""

    @property
    def id(self) -> str: ...

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> object: ...


@dataclass(frozen=True)
class SearchState:
    """A (question, steps so far) prefix, the unit the policy extends and the PPM scores."""

    tree_id: str  # the problem id; one tree per problem
    question: str
    history: str  # rendered steps so far (``mcts.steps.render_steps``), '' at the root
    seed: int  # derived from (run seed, round, problem id, node): makes sampling reproducible


@dataclass(frozen=True)
class Proposal:
    """One generated continuation, without its stop delimiter."""

    text: str
    stop: str | None  # the delimiter that ended generation (mcts.steps.STEP_END / ANSWER_END), None = length


class Policy(Protocol):
    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        """For each state, ``k`` sampled continuations (one step, or a whole solution in solution mode)."""
        ...


@dataclass(frozen=True)
class ExecRequest:
    """Run ``code`` in the interpreter state left by ``parent_key`` and keep the result as ``node_key``."""

    tree_id: str
    node_key: str  # unique within the tree
    parent_key: str | None  # None: a fresh interpreter
    history: tuple[str, ...]  # code of each step root -> parent, to rebuild the parent state on a miss
    code: str


class ExecOutcome(Protocol):
    ok: bool
    error: str | None  # None when ok, else a short "kind: message"
    stdout: str


class Executor(Protocol):
    def run(self, requests: Sequence[ExecRequest]) -> list[ExecOutcome]:
        """Execute a batch; results in request order."""
        ...

    def release(self, tree_id: str) -> None:
        """Forget every live state of a finished tree."""
        ...


class Scorer(Protocol):
    def score(self, states: Sequence[SearchState]) -> list[float]:
        """PPM score in [-1, 1] of each prefix (tanh of the value head at the last token)."""
        ...


# (problem, extracted answer or None) -> correct?  Production: ``data.grade``.
Grader = Callable[[ProblemLike, "str | None"], bool]
