"""Built-in generators: reproducible from a seed, graded difficulty, answers verified independently."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from data.expression import evaluate
from data.generators import generate_arithmetic, generate_countdown, solve
from data.problem import KIND_COUNTDOWN


def _as_fraction(answer: str) -> Fraction:
    return Fraction(answer)  # "12" or "7/2"


def test_arithmetic_is_reproducible_and_prefix_stable():
    a = generate_arithmetic(20, seed=3)
    assert a == generate_arithmetic(20, seed=3)
    assert generate_arithmetic(5, seed=3) == a[:5]  # problem i depends on (seed, i) only, not on n
    assert a != generate_arithmetic(20, seed=4)
    assert len({p.id for p in generate_arithmetic(300, seed=0, difficulty=1)}) == 300  # unique ids


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6])
def test_arithmetic_answers_match_their_expression(difficulty):
    for p in generate_arithmetic(40, seed=11, difficulty=difficulty):
        expression = p.meta["expression"]
        # Independent check: the answer the generator stepped to equals the AST evaluation of its expression.
        assert evaluate(expression) == _as_fraction(p.answer), (p.question, expression, p.answer)
        # Difficulty = number of operations; every operand is written in the question.
        assert len(re.findall(r" [-+*/] ", expression)) == difficulty == p.difficulty
        for number in re.findall(r"\d+", expression):
            assert number in p.question, (number, p.question)
        assert _as_fraction(p.answer) > 0


def test_arithmetic_difficulty_one_is_small():
    for p in generate_arithmetic(100, seed=0, difficulty=1):
        a, op, b = p.meta["expression"].split()
        assert op in "+-" and int(a) <= 20 and int(b) <= 10, p.meta["expression"]


def test_arithmetic_mix_covers_levels_and_some_fractions():
    problems = generate_arithmetic(300, seed=1)
    assert {p.difficulty for p in problems} == {1, 2, 3, 4, 5, 6}
    assert any("/" in p.answer for p in problems)  # simple fractions appear at higher levels
    assert all(_as_fraction(p.answer).denominator <= 5 for p in problems)


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="difficulty=7"):
        generate_arithmetic(1, difficulty=7)
    with pytest.raises(ValueError, match="n=-1"):
        generate_arithmetic(-1)


def test_countdown_is_reproducible_and_solvable():
    problems = generate_countdown(30, seed=5)
    assert problems == generate_countdown(30, seed=5)
    assert generate_countdown(10, seed=5) == problems[:10]
    for p in problems:
        numbers, target = p.meta["numbers"], int(p.answer)
        assert p.kind == KIND_COUNTDOWN and 3 <= len(numbers) <= 6
        assert target not in numbers and 10 <= target <= 1000
        # The stored solution, evaluated under Countdown's rules, reaches the target.
        assert evaluate(p.meta["solution"], numbers) == target, (numbers, target, p.meta["solution"])
        assert all(str(x) in p.question for x in numbers) and str(target) in p.question


@pytest.mark.parametrize(("difficulty", "count"), [(1, 3), (2, 3), (3, 4), (4, 4), (5, 5), (6, 6)])
def test_countdown_difficulty_sets_how_many_numbers(difficulty, count):
    for p in generate_countdown(5, seed=2, difficulty=difficulty):
        assert len(p.meta["numbers"]) == count and p.difficulty == difficulty


def test_solver_by_hand():
    found = solve([4, 6, 9], 24)
    assert found is not None and evaluate(found, [4, 6, 9]) == 24  # e.g. 4 * 6
    assert solve([1, 1, 1], 100) is None  # at most 1 + 1 + 1 = 3 (or 1*1*1): 100 is out of reach
    # 28 from 1, 2, 3, 8 needs a fraction: 8 * (3 + 1/2) = 28; the integers-only search cannot find it.
    assert solve([1, 2, 3, 8], 28) is None
    found = solve([1, 2, 3, 8], 28, positive_integers=False)
    assert found is not None and evaluate(found, [1, 2, 3, 8]) == 28
