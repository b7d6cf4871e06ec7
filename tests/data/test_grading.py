"""data.grading: dispatch by problem kind, reasons, batching, wall-clock bounds, threads, worker recovery."""

from __future__ import annotations

import threading
import time

import pytest

import data
from data.grading import Grade, Grader, GradingConfig, grade_countdown
from data.grading_pool import GradingWorkerError
from data.problem import KIND_COUNTDOWN, Problem


def _math(answer: str) -> Problem:
    return Problem(id=f"m-{answer}", question="q", answer=answer, source="test")


COUNTDOWN = Problem(id="c1", question="make 24", answer="24", source="test",
                    meta={"kind": KIND_COUNTDOWN, "numbers": [4, 6, 9, 9]})


@pytest.mark.parametrize(
    ("prediction", "correct", "reason"),
    [
        ("4 * 6", True, "expression equals 24"),
        ("(9 + 9 + 6) * 4 / 4", False, "4 is used 2 times"),  # only one 4 is given
        ("9 + 9 + 6", True, "equals 24"),  # not every number has to be used
        ("4 \\times 6 = 24", True, "equals 24"),  # an equation states the expression on its operator side
        ("24 = 6 * 4", True, "equals 24"),
        ("9 * 4 - 6", False, "expression equals 30, target 24"),  # 36 - 6
        ("24", False, "24 is not one of the given numbers"),  # the target itself is no expression
        ("6 * 4 ** 1", False, "Pow is not allowed"),
        ("6 / (9 - 9)", False, "division by zero"),
    ],
)
def test_countdown_is_graded_by_evaluation(prediction, correct, reason):
    grade = grade_countdown(COUNTDOWN, prediction)
    assert grade.correct is correct and reason in grade.reason, grade


def test_grade_dispatches_on_kind_and_keeps_order(grader):
    problems = [COUNTDOWN, _math("18"), _math("(x+1)^2"), _math("\\frac{1}{2}"), _math("7"), COUNTDOWN]
    predictions = ["6 * 4", "18.00", "x^2 + 2x + 1", "0.5", None, "6 + 4"]
    grades = grader.grade_many(problems, predictions)
    assert [g.correct for g in grades] == [True, True, True, True, False, False]
    assert grades[4] == Grade(False, "no answer")
    assert grades[2].reason == "math-verify"  # the one answer that needed a worker
    assert grader.grade(_math("18"), "18") is True
    with pytest.raises(ValueError, match="2 problems but 1 predictions"):
        grader.grade_many([COUNTDOWN, COUNTDOWN], ["1"])


def test_overlong_answers_are_not_parsed(grader):
    grade = grader.grade_detailed(_math("1"), "1+" * 600 + "1")
    assert not grade.correct and "grading.max_answer_chars=1000" in grade.reason


def test_timeout_is_not_equal_with_reason_and_the_pool_recovers(grader):
    start = time.monotonic()
    grade = grader.grade_detailed(_math("1"), "10^{10^{10}}")
    assert not grade.correct and grade.reason == "timed out after 2 s (worker killed)"
    assert time.monotonic() - start < 2.0 + 1.5  # the bound plus scheduling slack, not sympy's forever
    assert grader.grade_detailed(_math("2\\sqrt{2}"), "\\sqrt{8}").correct  # a fresh worker took over


def test_a_dead_worker_is_replaced(grader):
    grader.grade(_math("x"), "x^1")  # make sure a worker is warm and idle
    idle = grader._pool._idle  # the test reaches in to kill a real process, as the OOM killer would
    assert idle, "expected an idle warm worker"
    idle[0].proc.kill()
    idle[0].proc.wait()
    results = grader.grade_many([_math("(x+1)^2")] * 4, ["x^2+2x+1"] * 4)
    assert all(g.correct for g in results), results


def test_grading_from_many_threads(grader):
    pairs = [("\\sqrt{8}", "2\\sqrt{2}", True), ("x^2+1", "(x+1)^2", False), ("\\frac{1}{3}", "1/3", True)] * 4
    out: list[tuple[bool, bool]] = []
    lock = threading.Lock()

    def work(prediction, reference, expected):
        got = grader.grade(_math(reference), prediction)
        with lock:
            out.append((got, expected))

    threads = [threading.Thread(target=work, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(out) == len(pairs) and all(got == expected for got, expected in out), out


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"grading.workers=0: must be >= 1"):
        GradingConfig(workers=0)
    with pytest.raises(ValueError, match=r"grading.timeout_s=0: must be > 0"):
        GradingConfig(timeout_s=0)
    with pytest.raises(ValueError, match=r"grading.worker_memory_mb=10"):
        GradingConfig(worker_memory_mb=10)


def test_a_worker_that_cannot_start_in_time_is_an_error():
    with Grader(GradingConfig(workers=1, startup_timeout_s=0.001)) as g:
        with pytest.raises(GradingWorkerError, match="did not start within"):
            g.grade(_math("(x+1)^2"), "x^2+2x+1")


def test_module_level_functions_use_one_shared_grader():
    data.configure(GradingConfig(workers=1, timeout_s=2.0))
    try:
        assert data.is_equivalent("\\frac{2}{4}", "0.5")
        assert not data.is_equivalent("0.5", "50")
        assert data.grade(_math("(x+1)^2"), "x^2+2x+1")
        assert data.grade_detailed(COUNTDOWN, "4*6").correct
        assert [g.correct for g in data.grade_many([_math("3")], ["\\sqrt{9}"])] == [True]
        assert data.default_grader() is data.default_grader()
    finally:
        data.shutdown()
