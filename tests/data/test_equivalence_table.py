"""The equivalence table: answer pairs a math grader must get right, through the real two-tier grader.

Each row is (prediction, reference, expected). Rows are graded as one batch by the warm workers,
the way rollouts grade, and each row is asserted on its own so a failure names the pair.
"""

from __future__ import annotations

import time

import pytest

from data.equivalence import quick_compare
from data.problem import Problem

TABLE: list[tuple[str, str, bool]] = [
    # plain numbers, separators, currency and units
    ("18", "18", True),
    ("18.0", "18", True),
    ("1,000", "1000", True),
    ("\\$18", "18", True),
    ("18 dollars", "18", True),
    ("10\\text{ cm}", "10", True),
    ("90^\\circ", "90", True),
    ("-18", "18", False),
    ("17", "18", False),
    ("18.5", "18", False),
    ("1,2", "12", False),  # a list of two numbers, not twelve
    ("1000000", "10^6", True),
    ("1e3", "1000", True),
    ("10^3", "1000", True),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\frac12", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("0.3333333", "1/3", True),  # within 1e-6 relative
    ("1/3", "0.33", True),  # the reference was rounded to 2 places; 1/3 rounds to it
    ("0.33", "1/3", False),  # but a rounded prediction of an exact reference is wrong
    ("0.333", "1/3", False),
    ("0.15", "\\frac{3}{20}", True),
    ("1/2", "2", False),
    ("\\frac{{{{1}}}}{2}", "0.5", True),  # deeply braced LaTeX
    # percentages: scaling only where a % sign says so
    ("50", "50\\%", True),
    ("50\\%", "50", True),
    ("0.5", "50\\%", True),
    ("18\\%", "0.18", True),
    ("0.5", "50", False),  # no blanket x100 rule
    ("50", "0.5", False),
    ("5000\\%", "50\\%", False),
    # text answers
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "Evelin", False),
    ("(A)", "A", True),
    ("B", "A", False),
    # tuples, sets, intervals, matrices
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(3,5)", "(5,3)", False),  # ordered pairs
    ("3, 5, 7", "7, 5, 3", True),  # a list of solutions
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("[1,2)", "[1, 2)", True),
    ("(1,2)", "[1,2]", False),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("\\infty", "-\\infty", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    # symbolic expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x**2 + 2*x + 1", "(x+1)^2", True),  # Python syntax, read by an ast walk (never eval)
    ("x^2+1", "(x+1)^2", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("9", "\\sqrt{81}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sin(\\pi/3)", True),
    ("2*pi", "2\\pi", True),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}", True),
    ("p - q", "p-q", True),
    ("x", "y", False),
    ("6 - 5i", "6-5i", True),
    ("-2 + 7i", "7i - 2", True),
    ("x=5", "5", True),
    ("5", "x = 5", True),
    ("2516_8", "2516_8", True),
    ("52_8", "42", False),
    # boxes, garbage and adversarial input
    ("\\boxed{\\boxed{7}}", "7", True),
    ("\\boxed{7}", "8", False),
    ("", "5", False),
    ("garbage %$#@!", "5", False),
    ("__import__('os').system('echo pwned')", "0", False),
    ("\\frac{1}{0}", "0", False),
    ("10^{10^{10}}", "1", False),  # sympy would compute this forever: timeout, not a hang
    ("2^{2^{2^{2^{2^{2}}}}}", "0", False),
    ("9" * 500, "1", False),
]


def _problem(reference: str) -> Problem:
    return Problem(id="t", question="q", answer=reference, source="test")


def test_table_is_big_and_balanced():
    assert len(TABLE) >= 60, len(TABLE)
    assert sum(e for _, _, e in TABLE) >= 25 and sum(not e for _, _, e in TABLE) >= 25


@pytest.fixture(scope="module")
def table_grades(grader):
    start = time.monotonic()
    grades = grader.grade_many([_problem(r) for _, r, _ in TABLE], [p for p, _, _ in TABLE])
    return grades, time.monotonic() - start


@pytest.mark.parametrize(("prediction", "reference", "expected"), TABLE, ids=[f"{i:02d}" for i in range(len(TABLE))])
def test_equivalence_row(table_grades, prediction, reference, expected):
    grades, _ = table_grades
    got = grades[TABLE.index((prediction, reference, expected))]
    assert got.correct is expected, f"{prediction!r} vs {reference!r}: got {got}"


def test_adversarial_rows_are_bounded(table_grades):
    # Two rows time out (2 s bound each) on two workers; everything else is milliseconds.
    grades, elapsed = table_grades
    timed_out = [g for g in grades if "timed out" in g.reason or "died" in g.reason or "ran out" in g.reason]
    assert timed_out, "the huge-exponent rows should have hit the wall-clock bound or the memory limit"
    assert elapsed < 30, elapsed


def test_fast_tier_decides_plain_numbers_without_workers():
    assert quick_compare("1,000", "1000").equal  # 1,000 = 1000 exactly
    assert not quick_compare("0.5", "50").equal  # 1/2 != 50
    assert quick_compare("x^2", "x*x") is None  # symbolic: left to the workers
