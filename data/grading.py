"""Grading a problem's predicted answer: the judge every Q-value in the search comes from.

``grade(problem, prediction) -> bool`` is the ``mcts.protocols.Grader``. It dispatches on the
problem kind: a Countdown answer is an expression, evaluated exactly against the given numbers
(``data.expression``); anything else is an answer compared with the reference, first by the cheap
in-process rules and then, only if those cannot decide, by math-verify/sympy in warm worker
processes with a wall-clock bound (``data.grading_pool``). A timeout is "not equal", with the reason.

The module-level functions share one lazily started ``Grader`` per process (``configure`` sets its
config); the pipeline may also hold its own ``Grader(config)`` and pass ``grader.grade`` around.
"""

from __future__ import annotations

import atexit
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from data.equivalence import Verdict, quick_compare
from data.expression import ExpressionError, evaluate
from data.grading_pool import UNCACHEABLE, WorkerPool
from data.problem import KIND_COUNTDOWN, Problem


@dataclass(frozen=True)
class GradingConfig:
    """How answers are judged. Defaults suit a laptop; a rollout worker on a big node may raise ``workers``."""

    workers: int = 2  # warm comparison processes per grading process (each ~70 MB resident)
    timeout_s: float = 5.0  # wall-clock bound per answer in the slow tier; past it: "not equal"
    worker_memory_mb: int = 2048  # address-space limit per worker; sympy blowing past it is "not equal"
    startup_timeout_s: float = 120.0  # a worker that cannot import math-verify in this long is an error
    max_answer_chars: int = 1000  # longer predicted answers are "not equal" without parsing
    # Slow-tier verdicts remembered per (prediction, reference): rollouts of one problem reach the same
    # answers again and again. Timeouts and crashes are never cached. 0 turns the cache off.
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"grading.workers={self.workers}: must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"grading.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.worker_memory_mb < 256:
            raise ValueError(f"grading.worker_memory_mb={self.worker_memory_mb}: must be >= 256 (sympy needs it)")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"grading.startup_timeout_s={self.startup_timeout_s}: must be > 0 seconds")
        if self.max_answer_chars < 1:
            raise ValueError(f"grading.max_answer_chars={self.max_answer_chars}: must be >= 1")
        if self.cache_size < 0:
            raise ValueError(f"grading.cache_size={self.cache_size}: must be >= 0 (0 = no cache)")


@dataclass(frozen=True)
class Grade:
    """Whether an answer is right, and why (kept in tree rows and debugging reports)."""

    correct: bool
    reason: str


def _countdown_expression(prediction: str) -> str:
    # "25 * 4 = 100" and "100 = 25 * 4" both state the expression; the side with an operator is it.
    sides = [s for s in prediction.split("=") if s.strip()]
    with_ops = [s for s in sides if any(op in s for op in "+-*/×÷") or "\\times" in s or "\\div" in s]
    return (with_ops or sides or [prediction])[0]


def grade_countdown(problem: Problem, prediction: str) -> Grade:
    """Evaluate the submitted expression over the problem's numbers; right iff it equals the target."""
    numbers = list(problem.meta["numbers"])
    try:
        value = evaluate(_countdown_expression(prediction), numbers)
    except ExpressionError as exc:
        return Grade(False, f"invalid countdown expression: {exc.reason}")
    target = int(problem.answer)
    if value == target:
        return Grade(True, f"expression equals {target}")
    return Grade(False, f"expression equals {value}, target {target}")


class Grader:
    """Grades with one config and its own worker pool; ``close()`` (or the context manager) stops the workers."""

    def __init__(self, config: GradingConfig | None = None):
        self.config = config or GradingConfig()
        self._pool = WorkerPool(
            workers=self.config.workers,
            timeout_s=self.config.timeout_s,
            memory_mb=self.config.worker_memory_mb,
            startup_timeout_s=self.config.startup_timeout_s,
        )
        self._cache: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def _precheck(self, problem: Problem, prediction: str | None) -> Grade | tuple[str, str]:
        """A final Grade when no worker is needed, else the (prediction, reference) pair for the slow tier."""
        if prediction is None or not prediction.strip():
            return Grade(False, "no answer")
        if len(prediction) > self.config.max_answer_chars:
            return Grade(False, f"answer is {len(prediction)} characters (grading.max_answer_chars="
                                f"{self.config.max_answer_chars})")
        if problem.kind == KIND_COUNTDOWN:
            return grade_countdown(problem, prediction)
        verdict = quick_compare(prediction, problem.answer)
        if verdict is not None:
            return Grade(verdict.equal, verdict.reason)
        return prediction, problem.answer

    def grade_many(self, problems: Sequence[Problem], predictions: Sequence[str | None]) -> list[Grade]:
        """Grades in order; the slow-tier answers of the whole batch go to the workers together."""
        if len(problems) != len(predictions):
            raise ValueError(f"grade_many: {len(problems)} problems but {len(predictions)} predictions")
        grades: list[Grade | None] = []
        slow: list[tuple[str, str]] = []
        slow_at: list[int] = []
        for i, (problem, prediction) in enumerate(zip(problems, predictions, strict=True)):
            checked = self._precheck(problem, prediction)
            if isinstance(checked, Grade):
                grades.append(checked)
            else:
                grades.append(None)
                slow.append(checked)
                slow_at.append(i)
        for i, verdict in zip(slow_at, self._compare_slow(slow), strict=True):
            grades[i] = Grade(verdict.equal, verdict.reason)
        done = [g for g in grades if g is not None]
        assert len(done) == len(grades), f"{len(grades) - len(done)} answers left ungraded"
        return done

    def grade_detailed(self, problem: Problem, prediction: str | None) -> Grade:
        return self.grade_many([problem], [prediction])[0]

    def grade(self, problem: Problem, prediction: str | None) -> bool:
        """The ``mcts.protocols.Grader``: is ``prediction`` (an extracted answer, or None) right for ``problem``?"""
        return self.grade_detailed(problem, prediction).correct

    def compare(self, prediction: str, reference: str) -> Verdict:
        """Equivalence of two answer strings, both tiers, bounded like grading."""
        if not prediction.strip():
            return Verdict(False, "empty prediction")
        if len(prediction) > self.config.max_answer_chars:
            return Verdict(False, f"answer is {len(prediction)} characters")
        return quick_compare(prediction, reference) or self._compare_slow([(prediction, reference)])[0]

    def _compare_slow(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        """The workers' verdicts, each distinct pair computed once (cache, then dedup within the batch)."""
        known: dict[tuple[str, str], Verdict] = {}
        with self._cache_lock:
            for pair in pairs:
                if pair in self._cache:
                    self._cache.move_to_end(pair)
                    known[pair] = self._cache[pair]
        todo = list(dict.fromkeys(pair for pair in pairs if pair not in known))
        fresh = dict(zip(todo, self._pool.compare_many(todo), strict=True))
        if self.config.cache_size:
            with self._cache_lock:
                for pair, verdict in fresh.items():
                    if not verdict.reason.startswith(UNCACHEABLE):
                        self._cache[pair] = verdict
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        known.update(fresh)
        return [known[pair] for pair in pairs]


# ---- the shared per-process grader ---------------------------------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def configure(config: GradingConfig) -> None:
    """Use ``config`` for the module-level functions from now on (stops the current shared workers)."""
    global _default
    with _default_lock:
        old, _default = _default, Grader(config)
    if old is not None:
        old.close()


def default_grader() -> Grader:
    """The shared Grader of this process, created on first use with ``GradingConfig()`` unless configured."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
        return _default


def shutdown() -> None:
    """Stop the shared workers (also registered at exit); the next call starts fresh ones."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close()


atexit.register(shutdown)


def grade(problem: Problem, prediction: str | None) -> bool:
    """Is ``prediction`` right for ``problem``? (``mcts.protocols.Grader``; uses the shared grader.)"""
    return default_grader().grade(problem, prediction)


def grade_detailed(problem: Problem, prediction: str | None) -> Grade:
    """``grade`` with the reason."""
    return default_grader().grade_detailed(problem, prediction)


def grade_many(problems: Sequence[Problem], predictions: Sequence[str | None]) -> list[Grade]:
    """``grade_detailed`` for a batch; the slow answers are compared in parallel on the warm workers."""
    return default_grader().grade_many(problems, predictions)


def is_equivalent(prediction: str, reference: str) -> bool:
    """Does the extracted answer ``prediction`` mean the same as ``reference``? (Shared grader, bounded.)"""
    return default_grader().compare(prediction, reference).equal
