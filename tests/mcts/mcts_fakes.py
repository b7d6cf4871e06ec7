"""Scripted fakes for the mcts tests and bench: a policy that answers from a script, an executor that
runs (trusted, test-written) code in per-node namespaces, a scorer from a table, an exact-match grader."""

from __future__ import annotations

import contextlib
import io
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mcts.protocols import ExecRequest, Proposal, SearchState
from mcts.steps import ANSWER_END, STEP_END


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


def step(text: str) -> Proposal:
    return Proposal(text, STEP_END)


def final(text: str) -> Proposal:
    return Proposal(text, ANSWER_END)


class ScriptedPolicy:
    """``script(state) -> list[Proposal]`` (the first k are returned); records every batch it serves."""

    def __init__(self, script: Callable[[SearchState], list[Proposal]]):
        self.script = script
        self.batches: list[list[SearchState]] = []

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        self.batches.append(list(states))
        return [self.script(s)[:k] for s in states]


class TableScript:
    """Proposals keyed by the history's last step text ('' at the root); unknown prefixes get ``default``."""

    def __init__(self, table: dict[str, list[Proposal]], default: list[Proposal] | None = None):
        self.table = table
        self.default = default or []

    def __call__(self, state: SearchState) -> list[Proposal]:
        key = last_step(state.history)
        return list(self.table.get(key, self.default))


def last_step(history: str) -> str:
    if not history:
        return ""
    body = history.rstrip("\n").rsplit("\n", 1)[0]  # drop the delimiter line
    last = body.split(STEP_END + "\n")[-1]
    return "\n".join(ln for ln in last.splitlines() if not ln.startswith("# output: "))


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str | None
    stdout: str


class Locked:
    """A fake executor behind one lock, for callers on several threads (``mcts.wave.run_lanes``): the fakes keep
    plain dicts, and ``NamespaceExecutor`` captures stdout process-wide."""

    def __init__(self, inner) -> None:
        self.inner, self._lock = inner, threading.Lock()

    def run(self, requests):
        with self._lock:
            return self.inner.run(requests)

    def release(self, tree_id: str) -> None:
        with self._lock:
            self.inner.release(tree_id)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class NamespaceExecutor:
    """Runs each step in a copy of its parent's namespace, like the real sandbox's per-node states.
    Test-only: the code is written by the tests themselves."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], dict] = {}
        self.batches: list[list[ExecRequest]] = []
        self.released: list[str] = []

    def run(self, requests: Sequence[ExecRequest]) -> list[Outcome]:
        self.batches.append(list(requests))
        out = []
        for r in requests:
            if r.parent_key is None:
                ns: dict = {}
            else:
                ns = dict(self.states[(r.tree_id, r.parent_key)])
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(r.code, ns)  # noqa: S102 - fake executor over test-written code
            except Exception as e:  # the fake reports it like the sandbox: ok=False with "kind: message"
                out.append(Outcome(False, f"{type(e).__name__}: {e}", buf.getvalue()))
                continue
            self.states[(r.tree_id, r.node_key)] = ns
            out.append(Outcome(True, None, buf.getvalue()))
        return out

    def release(self, tree_id: str) -> None:
        self.released.append(tree_id)
        for key in [k for k in self.states if k[0] == tree_id]:
            del self.states[key]


class InstantExecutor:
    """Every step succeeds and prints nothing (for the benchmark and structure-only tests)."""

    def run(self, requests: Sequence[ExecRequest]) -> list[Outcome]:
        return [Outcome(True, None, "") for _ in requests]

    def release(self, tree_id: str) -> None:
        pass


class TableScorer:
    """PPM score by the rendered last step text (``default`` otherwise); records each batch."""

    def __init__(self, table: dict[str, float], default: float = 0.0):
        self.table = table
        self.default = default
        self.batches: list[list[SearchState]] = []

    def score(self, states: Sequence[SearchState]) -> list[float]:
        self.batches.append(list(states))
        return [self.table.get(last_step(s.history), self.default) for s in states]


def exact_grader(problem: Problem, answer: str | None) -> bool:
    return answer is not None and answer.strip() == problem.answer


def random_script(st):
    # A deterministic function of the state's seed: stands in for a sampling policy.
    rng = random.Random(st.seed)
    depth = st.history.count(STEP_END)
    out = []
    for _ in range(3):
        r = rng.random()
        if r < 0.15:
            out.append(step("# broken\nraise ValueError('no')"))
        elif r < 0.45 or depth >= 3:
            out.append(final(f"# The answer is \\boxed{{{rng.randint(3, 5)}}}"))
        else:
            out.append(step(f"# guess\nv = {rng.randint(0, 2)}\nprint(v)"))
    return out
