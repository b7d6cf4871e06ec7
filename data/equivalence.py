"""Is a predicted final answer the same as the reference? Cheap exact checks first, math-verify/sympy after.

Two tiers, because parsing and simplifying model output can hang (``10^{10^{10}}``) and no timeout
may use signals:

* ``quick_compare`` runs in the caller's process: plain numbers, fractions, decimals, percentages
  and identical normal forms, all bounded by the input length. It decides most answers outright.
* ``symbolic_compare`` is math-verify (then a sympy fallback for Python-style expressions). It runs
  only inside ``data.grading_pool`` workers, which the parent kills on a wall-clock bound; this
  module imports neither library at import time.

Percent rule: a ``%`` on one side lets that side's number also mean itself / 100 (``50%`` = ``0.5``,
and ``50%`` = ``50`` when the reference omitted the sign); without a ``%`` nothing is ever scaled.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

from data.answers import decimal_places, normalize, parse_number

_REL_TOLERANCE = Fraction(1, 10**6)  # a long decimal vs an exact reference (math-verify rounds to 6 places)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison and why (the reason lands in logs and rejected-answer reports)."""

    equal: bool
    reason: str


def _split_percent(s: str) -> tuple[str, bool]:
    if s.endswith("%"):
        return s[:-1].strip(), True
    return s, False


def _close(pred: Fraction, ref: Fraction, ref_text: str, pred_text: str) -> bool:
    if pred == ref:
        return True
    places = decimal_places(ref_text)
    if places is not None:
        # The reference was rounded ("0.33"): an exact 1/3 rounds to it.
        return round(pred, places) == ref
    if decimal_places(pred_text) is not None:
        return abs(pred - ref) <= _REL_TOLERANCE * max(1, abs(ref))
    return False


def quick_compare(prediction: str, reference: str) -> Verdict | None:
    """A decided Verdict when plain-number rules or identical normal forms settle it, else None."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred:
        return Verdict(False, "empty prediction")
    if pred == ref or pred.replace(" ", "").lower() == ref.replace(" ", "").lower():
        return Verdict(True, "same normal form")
    pred_body, pred_pct = _split_percent(pred)
    ref_body, ref_pct = _split_percent(ref)
    p, r = parse_number(pred_body), parse_number(ref_body)
    if p is None or r is None:
        return None
    if pred_pct and ref_pct:
        pairs = [(p, r)]
    else:
        pred_values = [p, p / 100] if pred_pct else [p]
        ref_values = [r, r / 100] if ref_pct else [r]
        pairs = [(pv, rv) for pv in pred_values for rv in ref_values]
    for pv, rv in pairs:
        # Rounding tolerance only applies to the numbers as written, not to their /100 readings.
        if pv == rv or (pv is p and rv is r and _close(p, r, ref_body, pred_body)):
            return Verdict(True, f"numbers equal: {pred!r} = {ref!r}")
    return Verdict(False, f"numbers differ: {pred!r} != {ref!r}")


# ---- the heavy tier: called only inside grading workers -------------------------------------------


@functools.lru_cache(maxsize=8192)
def _mv_parse(text: str) -> tuple:
    """math-verify's reading of one answer, cached: a worker sees the same references over and over."""
    from math_verify import parse

    # Wrapping in \boxed{} makes math-verify read the whole string as the answer (plain text,
    # LaTeX, sets, intervals, matrices alike). Timeouts are ours (the worker is killed), so its
    # own signal-based ones are off: they would break off the main thread.
    return tuple(parse("\\boxed{" + text + "}", parsing_timeout=None))


def _math_verify_equal(prediction: str, reference: str) -> bool:
    from math_verify import verify

    gold, pred = list(_mv_parse(reference)), list(_mv_parse(prediction))
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


_PY_FUNCS = ("sqrt", "sin", "cos", "tan", "log", "ln", "exp", "abs", "Abs")
_PY_CONSTS = ("pi", "e", "E", "I", "oo", "inf")
_MAX_POW_EXPONENT = 1000  # 2**1000 is fine; 10**(10**10) is how a grader gets stuck
# Python-style writing: '*' / '**', or a bare function/constant name (LaTeX would have a backslash).
_PYTHONISH_RE = re.compile(r"\*|(?<![\\A-Za-z])(?:sqrt|sin|cos|tan|log|ln|exp|abs|pi|oo)\b")


def _python_to_sympy(text: str):  # -> sympy.Basic | None
    """A sympy expression for Python-style math (``x**2 + 2*x``, ``sqrt(2)/2``, ``2x``), or None.

    Built by walking ``ast`` over an allow-list of nodes: model output is never ``eval``'d (sympy's
    ``parse_expr`` evals its input, so it is not used here).
    """
    import ast

    import sympy

    source = re.sub(r"(\d)\s*([A-Za-z(])", r"\1*\2", text.replace("^", "**"))
    if len(source) > 300:
        return None
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None
    consts = {"pi": sympy.pi, "e": sympy.E, "E": sympy.E, "I": sympy.I, "oo": sympy.oo, "inf": sympy.oo}
    funcs = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
             "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs, "Abs": sympy.Abs}
    binops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return sympy.nsimplify(node.value) if isinstance(node.value, float) else sympy.Integer(node.value)
        if isinstance(node, ast.Name):
            return consts.get(node.id) or (sympy.Symbol(node.id) if len(node.id) <= 2 else None)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = walk(node.operand)
            return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.Pow):
                if right.is_number and (not right.is_finite or abs(right) > _MAX_POW_EXPONENT):
                    return None
                return left**right
            op = binops.get(type(node.op))
            return None if op is None else op(left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in funcs:
            if node.keywords or len(node.args) != 1:
                return None
            arg = walk(node.args[0])
            return None if arg is None else funcs[node.func.id](arg)
        return None

    return walk(tree.body)


def _python_style_equal(prediction: str, reference: str) -> bool:
    """math-verify's comparison over sympy objects, where a side written in Python syntax is read by ``ast``."""
    from math_verify import verify

    sides = []
    for text in (reference, prediction):
        expr = _python_to_sympy(text)
        sides.append([expr] if expr is not None else list(_mv_parse(text)))
    gold, pred = sides
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def symbolic_compare(prediction: str, reference: str) -> Verdict:
    """math-verify on the raw then the normalized strings, then sympy; may be slow: run it in a worker."""
    attempts = [(prediction, reference)]
    pred, ref = normalize(prediction), normalize(reference)
    pred_body, pred_pct = _split_percent(pred)
    ref_body, ref_pct = _split_percent(ref)
    if (pred, ref) != (prediction, reference):
        attempts.append((pred, ref))
    if pred_pct != ref_pct:
        # The percent rule (module doc): the side with '%' may also be read without it.
        attempts.append((pred_body, ref_body))
    for p, r in attempts:
        if _math_verify_equal(p, r):
            return Verdict(True, "math-verify")
    if any(_PYTHONISH_RE.search(t) for t in attempts[-1]) and _python_style_equal(*attempts[-1]):
        return Verdict(True, "sympy (python-style expression)")
    return Verdict(False, "not equivalent (math-verify, sympy)")


def compare(prediction: str, reference: str) -> Verdict:
    """Both tiers in this process, with no time bound: for workers and tests, never for model output at large."""
    return quick_compare(prediction, reference) or symbolic_compare(prediction, reference)
