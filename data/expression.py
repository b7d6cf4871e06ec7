"""Safe, exact evaluation of +-*/ arithmetic over integers: Countdown answers and generator self-checks.

Model-written text is never given to ``eval``: it is parsed with ``ast`` and walked, accepting only
integer literals, ``+ - * /`` and parentheses, in exact ``Fraction`` arithmetic. Countdown's rule
("each given number at most once") is checked on the literals the expression actually contains.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

MAX_EXPRESSION_CHARS = 300  # a Countdown answer over six numbers is ~40 characters
MAX_LITERAL_DIGITS = 12  # keeps every product of a handful of literals small

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_REPLACEMENTS = (
    ("\\left", ""), ("\\right", ""), ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"),
    ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"), ("–", "-"), ("\\,", ""), ("\\!", ""), ("$", ""),
)


class ExpressionError(ValueError):
    """Text that is not an allowed arithmetic expression (or breaks Countdown's rules); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_python_syntax(text: str) -> str:
    """LaTeX or typographic arithmetic as plain ``+-*/()`` text: ``\\frac{6}{3} \\times 4`` -> ``(6)/(3) * 4``."""
    s = text.strip()
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    while True:
        t = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", s)
        if t == s:
            break
        s = t
    return s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")").strip()


def apply_op(op: str, left: Fraction | int, right: Fraction | int) -> Fraction:
    """``left op right`` for op in ``+ - * /``, exactly; division by zero is an ExpressionError."""
    if op == "+":
        return Fraction(left) + right
    if op == "-":
        return Fraction(left) - right
    if op == "*":
        return Fraction(left) * right
    if right == 0:
        raise ExpressionError("division by zero")
    return Fraction(left) / right


def _walk(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int):
            raise ExpressionError(f"only integers are allowed, got {node.value!r}")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        op = _OPS.get(type(node.op))
        if op is None:
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        return apply_op(op, _walk(node.left, literals), _walk(node.right, literals))
    if isinstance(node, ast.UnaryOp):
        raise ExpressionError("unary signs are not allowed: each number is used as given")
    raise ExpressionError(f"{type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")


def evaluate(text: str, numbers: Sequence[int] | None = None) -> Fraction:
    """The exact value of ``text``; with ``numbers``, also check each literal is one of them, used at most once.

    Raises ExpressionError with the reason for anything else (syntax, names, calls, powers, too long,
    a number not given or used too often, division by zero).
    """
    source = to_python_syntax(text)
    if not source:
        raise ExpressionError("empty expression")
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression is {len(source)} characters; at most {MAX_EXPRESSION_CHARS} allowed")
    if re.search(r"\d{" + str(MAX_LITERAL_DIGITS + 1) + ",}", source):
        raise ExpressionError(f"a number has more than {MAX_LITERAL_DIGITS} digits")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ExpressionError(f"not a valid expression: {type(exc).__name__}: {exc}") from exc
    literals: list[int] = []
    try:
        value = _walk(tree.body, literals)
    except RecursionError as exc:
        raise ExpressionError("expression nested too deeply") from exc
    if numbers is not None:
        available = Counter(numbers)
        for number, used in sorted(Counter(literals).items()):
            if number not in available:
                raise ExpressionError(f"{number} is not one of the given numbers {sorted(numbers)}")
            if used > available[number]:
                raise ExpressionError(f"{number} is used {used} times but given {available[number]} time(s)")
    return value
