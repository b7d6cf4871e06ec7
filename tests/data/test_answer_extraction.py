"""data.answers: boxed extraction with nesting, last-number fallback, normal forms and exact numerals."""

from __future__ import annotations

from fractions import Fraction

import pytest

from data.answers import decimal_places, extract_answer, gsm8k_answer, last_boxed, last_number, normalize, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# The answer is \\boxed{8}", "8"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # braces inside are balanced, not cut at the first '}'
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{\\boxed{5}}", "5"),  # a box inside a box is unwrapped
        ("\\boxed{ \\boxed{ \\boxed{x+1} } }", "x+1"),
        ("\\boxed{\\boxed{2} + 1}", "\\boxed{2} + 1"),  # not a wrapper: kept whole
        ("\\boxed {42}", "42"),  # a space before the brace
        ("\\boxed{1} and then \\boxed{2", None),  # the last box is unclosed: still writing
        ("no box here", None),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_falls_back_to_last_number_only_when_asked():
    text = "She has 3 apples, then 5, so 8 in total."
    assert extract_answer(text) is None
    assert extract_answer(text, fallback_last_number=True) == "8"
    assert extract_answer("\\boxed{7} and later 9", fallback_last_number=True) == "7"  # a box beats the fallback
    # An unclosed box is not an invitation to guess a number from it.
    assert extract_answer("\\boxed{12", fallback_last_number=True) is None
    assert extract_answer(None) is None and extract_answer("") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("total 1,234 apples", "1234"), ("it is -0.5 now", "-0.5"), ("about 3/4 of it", "3/4"), ("none", None)],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_gsm8k_answer():
    assert gsm8k_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_answer("... #### 1,250") == "1250"
    assert gsm8k_answer("no marker") is None
    assert gsm8k_answer("#### ") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$\\$18$", "18"),
        ("10\\text{ cm}", "10"),
        ("\\text{Evelyn}", "Evelyn"),
        ("90^\\circ", "90"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("50\\%", "50%"),  # percent kept: the comparison decides what it means
        ("18 dollars.", "18"),
        ("\\boxed{7}", "7"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", Fraction(12)),
        ("-1,234.50", Fraction(-123450, 100)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("\\frac34", Fraction(3, 4)),
        ("2e3", Fraction(2000)),
        (".5", Fraction(1, 2)),
        ("1/0", None),
        ("1e999", None),  # exponent over the cap: left to the bounded workers
        ("x", None),
        ("1,2", None),  # a list, not a number
        ("9" * 401, None),  # longer than the in-process cap
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_decimal_places():
    assert decimal_places("0.33") == 2 and decimal_places("1,000.5") == 1
    assert decimal_places("12") is None and decimal_places("1/3") is None
