"""Scripted stand-ins for the strategy tests: a policy from a function, a PPM from a table, an executor that
runs test-written code in per-node namespaces (the real sandbox's per-node states, without the isolation)."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mcts.protocols import ExecRequest, Proposal, SearchState
from mcts.steps import ANSWER_END, STEP_END


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


def last_step(history: str) -> str:
    """The last rendered step's text without its output lines and delimiter ('' at the root)."""
    if not history:
        return ""
    body = history.rstrip("\n").rsplit("\n", 1)[0]
    last = body.split(STEP_END + "\n")[-1]
    return "\n".join(ln for ln in last.splitlines() if not ln.startswith("# output: "))


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


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str | None
    stdout: str


class NamespaceExecutor:
    """Each step runs in a copy of its parent's namespace. Test-only: the code is written by the tests."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], dict] = {}
        self.requests: list[ExecRequest] = []
        self.released: list[str] = []

    def run(self, requests: Sequence[ExecRequest]) -> list[Outcome]:
        out = []
        for r in requests:
            self.requests.append(r)
            ns = dict(self.states[(r.tree_id, r.parent_key)]) if r.parent_key is not None else {}
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(r.code, ns)  # noqa: S102 - test-written code only
            except Exception as e:  # reported like the sandbox: ok=False with "kind: message"
                out.append(Outcome(False, f"{type(e).__name__}: {e}", buf.getvalue()))
                continue
            self.states[(r.tree_id, r.node_key)] = ns
            out.append(Outcome(True, None, buf.getvalue()))
        return out

    def release(self, tree_id: str) -> None:
        self.released.append(tree_id)
        self.states = {k: v for k, v in self.states.items() if k[0] != tree_id}
