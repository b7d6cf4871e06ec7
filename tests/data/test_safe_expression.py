"""data.expression: exact +-*/ evaluation by an AST walk, Countdown's number rule, and what it refuses."""

from __future__ import annotations

from fractions import Fraction

import pytest

from data.expression import ExpressionError, evaluate, to_python_syntax


def test_exact_fraction_arithmetic():
    assert evaluate("(25 - 5) * 4 + 3") == 83  # 20 * 4 + 3
    assert evaluate("8 / (3 - 8 / 3)") == 24  # 3 - 8/3 = 1/3; 8 / (1/3) = 24 exactly, no float error
    assert evaluate("1 / 3") == Fraction(1, 3)


def test_latex_and_typographic_operators():
    assert to_python_syntax("\\frac{6}{3} \\times 4") == "(6)/(3) * 4"
    assert evaluate("\\left(7 - 1\\right) \\cdot 4") == 24
    assert evaluate("6 × 4 ÷ 2 − 1") == 11  # 24 / 2 - 1


def test_numbers_used_at_most_once():
    assert evaluate("6 * 4", numbers=[4, 6, 9]) == 24  # not every number has to be used
    assert evaluate("6 * 6", numbers=[6, 6]) == 36  # duplicates may be used as often as given
    with pytest.raises(ExpressionError, match="6 is used 2 times but given 1"):
        evaluate("6 * 6", numbers=[6, 4])
    with pytest.raises(ExpressionError, match="5 is not one of the given numbers"):
        evaluate("5 * 4", numbers=[6, 4])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("__import__('os').system('echo hi')", "not allowed"),
        ("2 ** 10", "Pow is not allowed"),
        ("-3 + 5", "unary signs"),
        ("1.5 * 2", "only integers"),
        ("4 / (2 - 2)", "division by zero"),
        ("(" * 400 + "1" + ")" * 400, "characters"),
        ("1" * 13, "more than 12 digits"),
        ("3 +", "not a valid expression"),
        ("", "empty"),
        ("x * 2", "Name is not allowed"),
    ],
)
def test_refuses_anything_but_arithmetic(text, reason):
    with pytest.raises(ExpressionError, match=reason):
        evaluate(text)
