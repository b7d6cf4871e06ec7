"""Multi-step arithmetic word problems with exact answers, seeded, at difficulty 1..6 (= operations).

Difficulty 1 is one addition or subtraction on numbers up to 20, something a 135M-parameter model
gets right now and then; each level adds an operation and widens the number range, and from level
3 on a division may leave a simple fraction (only for quantities that can be split: liters, meters).
Every problem carries the plain expression it was built from (``meta["expression"]``), so its
answer can be checked independently with ``data.expression.evaluate``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from data.expression import apply_op
from data.generators.common import MAX_DIFFICULTY, check_args
from data.problem import Problem, content_id

SOURCE = "builtin:arithmetic"

_NAMES = (
    ("Maya", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Omar", "he", "his"),
    ("Priya", "she", "her"), ("Tom", "he", "his"), ("Sofia", "she", "her"), ("Ken", "he", "his"),
    ("Lena", "she", "her"), ("Ravi", "he", "his"), ("Zoe", "she", "her"), ("Sam", "he", "his"),
)
# (plural, singular, what the whole amount is called)
_COUNT_ITEMS = tuple((f"{w}s", w, f"{w}s") for w in (
    "apple", "sticker", "marble", "book", "pencil", "cookie", "stamp", "shell", "card", "coin"))
_MEASURE_ITEMS = (
    ("liters of juice", "liter of juice", "juice"), ("meters of ribbon", "meter of ribbon", "ribbon"),
    ("kilograms of flour", "kilogram of flour", "flour"), ("cups of milk", "cup of milk", "milk"),
)

# Each phrasing takes the actor's pronouns, the item (plural or singular to agree with n), the whole
# amount's name and the operand n. Phrasings start lowercase; the sentence builder capitalises.
_PHRASES = {
    "+": (
        "{he} buys {n} more {item}.",
        "{he} finds {n} more {item}.",
        "a friend gives {him} {n} {item}.",
    ),
    "-": (
        "{he} gives {n} {item} to a neighbor.",
        "{he} uses {n} {item}.",
        "{he} loses {n} {item}.",
    ),
    "*": (
        "{he} ends up with {n} times as {many} {whole} as before.",
        "the {amount} of {his} {whole} becomes {n} times as large.",
    ),
    "/": (
        "{he} splits {his} {whole} into {n} equal parts and keeps one part.",
        "{he} shares {his} {whole} equally among {n} people, {himself} included, and keeps {his} share.",
    ),
}
_CONNECTORS = ("", "Then ", "After that, ", "Next, ", "Later, ")


@dataclass(frozen=True)
class _Level:
    start_max: int
    operand_max: int
    factor_max: int
    ops: tuple[str, ...]


def _level(difficulty: int) -> _Level:
    if difficulty == 1:
        return _Level(start_max=20, operand_max=10, factor_max=2, ops=("+", "-"))
    if difficulty == 2:
        return _Level(start_max=30, operand_max=15, factor_max=3, ops=("+", "-", "*"))
    return _Level(start_max=15 * difficulty, operand_max=10 * difficulty, factor_max=5, ops=("+", "-", "*", "/"))


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _choose_step(rng: random.Random, level: _Level, value: Fraction, measure: bool) -> tuple[str, int] | None:
    """One (op, operand) that keeps the quantity positive and small, or None when none fits this draw."""
    op = rng.choice(level.ops)
    if op == "+":
        return op, rng.randint(1, level.operand_max)
    if op == "-":
        largest = min(value - 1, level.operand_max)  # keep at least one unit (or a fraction of one)
        if largest < 1:
            return None
        return op, rng.randint(1, int(largest))
    if op == "*":
        if value > 200:  # keep products in the range a small model can hold
            return None
        return op, rng.randint(2, level.factor_max)
    divisors = [k for k in range(2, 7) if (value / k).denominator == 1]
    if measure and value.denominator == 1:
        divisors = list(range(2, 6))  # a simple fraction is fine for liters and meters
    if not divisors:
        return None
    return op, rng.choice(divisors)


def _one_problem(rng: random.Random, difficulty: int) -> tuple[str, Fraction, str]:
    """(question, answer, expression) with exactly ``difficulty`` operations."""
    level = _level(difficulty)
    name, he, his = rng.choice(_NAMES)
    measure = difficulty >= 3 and rng.random() < 0.3
    item, item_one, whole = rng.choice(_MEASURE_ITEMS if measure else _COUNT_ITEMS)
    him = "her" if he == "she" else "him"
    start = rng.randint(2, level.start_max)
    value = Fraction(start)
    expression = str(start)
    sentences = [f"{name} has {start} {item}."]
    while len(sentences) - 1 < difficulty:
        step = _choose_step(rng, level, value, measure)
        if step is None:
            continue
        op, n = step
        if op == "/" and value.denominator != 1:
            continue  # at most one fractional split: keeps answers to simple fractions
        phrase = rng.choice(_PHRASES[op])
        text = phrase.format(he=he, him=him, himself=f"{him}self", his=his, whole=whole,
                             many="much" if measure else "many", amount="amount" if measure else "number",
                             item=item_one if n == 1 else item, n=n)
        connector = rng.choice(_CONNECTORS) if len(sentences) > 1 else ""
        text = connector + text if connector else text[0].upper() + text[1:]
        sentences.append(text)
        value = apply_op(op, value, n)
        expression = f"({expression} {op} {n})"
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), value, expression[1:-1] if expression.startswith("(") else expression


def generate_arithmetic(n: int, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    """``n`` distinct problems; ``difficulty`` 1..6 fixes the number of operations, None mixes 1..6.

    Problem ``i`` depends only on (seed, i, difficulty), so a larger ``n`` extends a smaller one.
    """
    check_args(n, difficulty)
    problems: list[Problem] = []
    seen: set[str] = set()
    i = 0
    while len(problems) < n:
        rng = random.Random(f"arithmetic:{seed}:{difficulty}:{i}")
        i += 1
        level = difficulty if difficulty is not None else rng.randint(1, MAX_DIFFICULTY)
        question, value, expression = _one_problem(rng, level)
        if question in seen:
            continue  # small number ranges at difficulty 1 repeat now and then; ids must stay unique
        seen.add(question)
        answer = _fmt(value)
        problems.append(Problem(
            id=content_id(SOURCE, question, answer), question=question, answer=answer, source=SOURCE,
            difficulty=level, meta={"expression": expression},
        ))
        if i > 50 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct arithmetic problems at difficulty {difficulty}")
    return problems
