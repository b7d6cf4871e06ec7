"""Tool-integrated verification (T1-style): execute code to check a candidate before the PPM ranks it.

Two checks per answered candidate, both in the sandbox (the ``Executor``), never in this process:

1. **Re-run**: the candidate's own code, all steps joined, runs once in a fresh interpreter. It fails when the
   code raises or times out (the search ran it step by step in forked states; a clean re-run catches state
   that only existed by accident), or when the code printed numbers and the boxed answer is none of them
   (the answer was not what the code computed: a plausible-looking number typed in by hand).
2. **Check program** (when a ``checker`` policy is given): the policy writes one more step after the solution,
   prompted to substitute the answer back or recompute it another way and print True or False. It runs in the
   re-run's state. It fails when it raises (e.g. a failed ``assert``) or its last printed line is ``False``.
   A check that does not parse or has no code counts as no check (the candidate keeps its re-run verdict).

A candidate without an answer fails (there is nothing to check). Which candidates pass is returned as a list
of ``Verdict`` per problem; ``rounds.solve`` drops the failures before ``select``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mcts.expand import parse_proposal
from mcts.protocols import ExecRequest, Executor, Policy, SearchState
from mcts.seeds import derive_seed
from mcts.steps import render_steps
from rounds.strategies.base import Candidate
from rounds.voting import normalise

_NUMBER = re.compile(r"[+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")

CHECK_PROMPT = ("# Check: substitute the answer {answer} back into the problem, or compute it another way, "
                "and print True if it is right, else False\n")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # '' when it passed; else which check failed and why


def printed_numbers(stdout: str) -> set[str]:
    """Normal forms of every number in ``stdout`` ('12.0' and '12' are one)."""
    return {normalise(m.group(0)) for m in _NUMBER.finditer(stdout)}


def answer_consistent(answer: str, stdout: str) -> bool:
    """True unless the code printed numbers and the (numeric) answer is none of them. A non-numeric answer,
    or code that printed no number, cannot be checked this way and passes."""
    printed = printed_numbers(stdout)
    form = normalise(answer)
    if not printed or not _NUMBER.fullmatch(form):
        return True
    return form in printed


class Verifier:
    def __init__(self, executor: Executor, checker: Policy | None = None, seed: int = 0):
        self.executor = executor
        self.checker = checker
        self.seed = seed

    def verify(self, problems: Sequence[object], candidates: Sequence[Sequence[Candidate]]) -> list[list[Verdict]]:
        """One verdict per candidate, all re-runs in one executor batch and all checks in one policy batch."""
        jobs: list[tuple[int, int, str]] = []  # (problem index, candidate index, tree id)
        reqs: list[ExecRequest] = []
        out: list[list[Verdict]] = [[Verdict(False, "no answer") for _ in row] for row in candidates]
        for i, (p, row) in enumerate(zip(problems, candidates, strict=True)):
            for j, c in enumerate(row):
                if c.answer is None:
                    continue
                tree = f"{p.id}#verify{j}"  # type: ignore[attr-defined]
                jobs.append((i, j, tree))
                reqs.append(ExecRequest(tree, "rerun", None, (), joined_code(c)))
        results = self.executor.run(reqs) if reqs else []
        passed: list[tuple[int, int, str]] = []
        for (i, j, tree), r in zip(jobs, results, strict=True):
            c = candidates[i][j]
            if not r.ok:
                out[i][j] = Verdict(False, f"re-run failed: {r.error}")
            elif not answer_consistent(c.answer or "", r.stdout):
                out[i][j] = Verdict(False, f"answer {c.answer!r} is not among the numbers its code printed")
            else:
                out[i][j] = Verdict(True, "")
                passed.append((i, j, tree))
        if self.checker is not None and passed:
            self._check(problems, candidates, passed, out)
        for _i, _j, tree in jobs:
            self.executor.release(tree)
        return out

    def _check(self, problems: Sequence[object], candidates: Sequence[Sequence[Candidate]],
               passed: list[tuple[int, int, str]], out: list[list[Verdict]]) -> None:
        states = []
        for i, j, tree in passed:
            c, p = candidates[i][j], problems[i]
            states.append(SearchState(tree, str(p.question), _as_open(c) + CHECK_PROMPT.format(answer=c.answer),  # type: ignore[attr-defined]
                                      derive_seed("verify", self.seed, str(p.id), j)))  # type: ignore[attr-defined]
        proposals = self.checker.propose(states, 1)  # type: ignore[union-attr]
        reqs: list[ExecRequest] = []
        where: list[tuple[int, int]] = []
        for (i, j, tree), props in zip(passed, proposals, strict=True):
            chain = parse_proposal(props[0], 1, require_code=True) if props else None
            if chain is None or not chain.steps or not chain.steps[0].code.strip():
                continue  # no check program written: the re-run verdict stands
            reqs.append(ExecRequest(tree, "check", "rerun", (joined_code(candidates[i][j]),), chain.steps[0].code))
            where.append((i, j))
        for (i, j), r in zip(where, self.executor.run(reqs) if reqs else [], strict=True):
            last = r.stdout.strip().splitlines()[-1].strip() if r.stdout.strip() else ""
            if not r.ok:
                out[i][j] = Verdict(False, f"check program failed: {r.error}")
            elif last == "False":
                out[i][j] = Verdict(False, "check program printed False")


def joined_code(c: Candidate) -> str:
    """All of a candidate's code as one program, steps in order."""
    return "\n".join(code for code in c.codes if code.strip())


def _as_open(c: Candidate) -> str:
    """The solution rendered with its last step as an open (non-final) step, so the policy writes one more."""
    return render_steps([(s.text, s.stdout, False) for s in c.steps])
