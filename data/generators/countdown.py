"""Countdown problems: reach a target from 3-6 numbers with + - * /, each number at most once.

An instance is built by combining a random subset of its numbers into a target, then kept only if
the independent solver (``solve``, an exhaustive search with a state budget) also reaches it, so
every emitted problem is solvable. Answers are expressions, graded by evaluating them exactly
(``data.expression.evaluate``), never by comparing strings.
"""

from __future__ import annotations

import random
from fractions import Fraction

from data.generators.common import MAX_DIFFICULTY, check_args
from data.problem import KIND_COUNTDOWN, Problem, content_id

SOURCE = "builtin:countdown"
_LARGE = (25, 50, 75, 100)
# difficulty -> (how many numbers are given, how many of them the construction combines)
_SHAPE = {1: (3, 2), 2: (3, 3), 3: (4, 3), 4: (4, 4), 5: (5, 4), 6: (6, 5)}
DEFAULT_SOLVER_STATES = 200_000  # enough for any 6-number instance that has a solution reachable from its build


def solve(
    numbers: list[int], target: int, max_states: int = DEFAULT_SOLVER_STATES, positive_integers: bool = True
) -> str | None:
    """An expression over ``numbers`` (each at most once) equal to ``target``; None if none was found.

    Depth-first over "pick two values, replace them by their combination", in exact fractions, with
    each multiset of values visited once. ``positive_integers`` keeps only positive whole intermediate
    values (classic Countdown: a much smaller space, and every generated instance has such a
    solution); False searches all rationals, as the grader allows. ``max_states`` bounds the work
    deterministically (a count, not a clock); None can therefore also mean "not found within the budget".
    """
    goal = Fraction(target)
    seen: set[tuple[Fraction, ...]] = set()
    budget = [max_states]

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        for value, expr in items:
            if value == goal:
                return expr
        if len(items) < 2 or budget[0] <= 0:
            return None
        key = tuple(sorted(v for v, _ in items))
        if key in seen:
            return None
        seen.add(key)
        budget[0] -= 1
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k != i and k != j]
                candidates = [(a + b, f"({ea} + {eb})"), (a * b, f"({ea} * {eb})"),
                              (a - b, f"({ea} - {eb})"), (b - a, f"({eb} - {ea})")]
                if b != 0:
                    candidates.append((a / b, f"({ea} / {eb})"))
                if a != 0:
                    candidates.append((b / a, f"({eb} / {ea})"))
                for value, expr in candidates:
                    if positive_integers and (value <= 0 or value.denominator != 1):
                        continue
                    found = search(rest + [(value, expr)])
                    if found is not None:
                        return found
        return None

    found = search([(Fraction(x), str(x)) for x in numbers])
    if found is not None and found.startswith("(") and found.endswith(")"):
        found = found[1:-1]
    return found


def _build_target(rng: random.Random, numbers: list[int], used: int) -> int | None:
    """Combine ``used`` of the numbers left to right with random ops, integer steps only; None if it went bad."""
    pool = rng.sample(numbers, used)
    value = pool[0]
    for x in pool[1:]:
        op = rng.choice("+-*/")
        if op == "/" and (x == 0 or value % x):
            op = "+"
        if op == "-" and value - x <= 0:
            op = "+"
        if op == "*" and value * x > 1000:
            op = "-" if value - x > 0 else "+"
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x if x else value}[op]
    return value if value > 0 else None


def countdown_question(numbers: list[int], target: int) -> str:
    listed = ", ".join(str(x) for x in numbers)
    return (
        f"Using the numbers {listed}, make {target}. You may use +, -, * and / and parentheses; "
        "each number may be used at most once, and you do not have to use all of them. "
        "Give the expression itself (not its value) as the final answer."
    )


def generate_countdown(n: int, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    """``n`` distinct solvable instances; difficulty 1..6 sets how many numbers (3..6), None mixes.

    Problem ``i`` depends only on (seed, i, difficulty). ``meta["solution"]`` is the solver's expression.
    """
    check_args(n, difficulty)
    problems: list[Problem] = []
    seen: set[str] = set()
    i = 0
    while len(problems) < n:
        if i > 50 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct countdown problems at difficulty {difficulty}")
        rng = random.Random(f"countdown:{seed}:{difficulty}:{i}")
        i += 1
        level = difficulty if difficulty is not None else rng.randint(1, MAX_DIFFICULTY)
        count, used = _SHAPE[level]
        small_max = 10 if level <= 2 else 15
        numbers = [rng.randint(1, small_max) for _ in range(count)]
        if level >= 3:
            numbers[rng.randrange(count)] = rng.choice(_LARGE)
        target = _build_target(rng, numbers, used)
        # A target that is one of the numbers, or tiny, would be solved without any arithmetic.
        if target is None or target in numbers or target < 10 or target > 1000:
            continue
        question = countdown_question(numbers, target)
        if question in seen:
            continue
        solution = solve(numbers, target)
        if solution is None:
            continue  # only solvable instances are emitted
        seen.add(question)
        answer = str(target)
        problems.append(Problem(
            id=content_id(SOURCE, question, answer), question=question, answer=answer, source=SOURCE,
            difficulty=level, meta={"kind": KIND_COUNTDOWN, "numbers": numbers, "solution": solution},
        ))
    return problems
