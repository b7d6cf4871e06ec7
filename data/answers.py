"""Final answers as strings: pull them out of model text, clean them, read plain numbers exactly.

Everything here is pure string work bounded by the input length (no sympy, no math-verify), so it
runs in-process on any thread and is safe to call from ``mcts``. The expensive symbolic comparison
lives in ``data.equivalence`` and runs in killable worker processes (``data.grading_pool``).
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED_RE = re.compile(r"\\boxed\s*\{")
# Numbers as people write final answers: -1,234.5  .5  3/4 (thousands commas only in groups of three,
# so "1,2" stays a list of two numbers).
_LAST_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_PLAIN_NUMBER_RE = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?$|^[-+]?\.\d+$")
_SLASH_FRACTION_RE = re.compile(r"^([-+]?\d+)\s*/\s*([-+]?\d+)$")
_LATEX_FRACTION_RE = re.compile(r"^([-+]?)\\[dt]?frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))$")
_SCI_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*(?:[eE]|\\times\s*10\s*\^|\*\s*10\s*\*\*)\s*\{?\s*([-+]?\d+)\s*\}?$")
_MAX_NUMBER_CHARS = 400  # longer "numbers" go to the workers; keeps Fraction work here trivially bounded
_MAX_SCI_EXPONENT = 400

# LaTeX spacing and sizing macros that never change a value.
_NOISE = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\displaystyle", "\\tfrac", "\\dfrac",
)
_UNIT_WORDS_RE = re.compile(r"^(?P<num>[-+]?[\d.,/]+)\s+(?P<words>[A-Za-z][A-Za-z .]*)$")
_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm|mathbf)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")


def _boxed_spans(text: str) -> list[tuple[int, int | None]]:
    """(content start, content end or None if unclosed) of each top-level ``\\boxed{...}``, left to right."""
    spans: list[tuple[int, int | None]] = []
    pos = 0
    while True:
        m = _BOXED_RE.search(text, pos)
        if m is None:
            return spans
        start = m.end()
        depth = 1
        end = None
        for j in range(start, len(text)):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
        spans.append((start, end))
        if end is None:
            return spans  # an unclosed box swallows the rest of the text
        pos = end + 1


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}``, braces balanced, stripped; None when absent or unclosed.

    Nested boxes are unwrapped: ``\\boxed{\\boxed{5}}`` gives ``5``. When the last box is unclosed the
    answer is None even if an earlier box closed (the model was still writing its answer).
    """
    spans = _boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    if end is None:
        return None
    content = text[start:end].strip()
    while _BOXED_RE.match(content):
        s, e = _boxed_spans(content)[0]
        if e is None or content[e + 1 :].strip():
            break  # "\boxed{2} + 1" is not a wrapper; keep it whole
        content = content[s:e].strip()
    return content


def last_number(text: str) -> str | None:
    """The last number written in ``text`` ("1,234", "-0.5", "3/4"), thousands commas removed; None if none."""
    found = _LAST_NUMBER_RE.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").replace(" ", "")


def extract_answer(text: str | None, fallback_last_number: bool = False) -> str | None:
    """The final answer in model output: the last ``\\boxed{}``; else, only if allowed, the last number."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    if fallback_last_number and _boxed_spans(text) == []:
        return last_number(text)
    return None


def gsm8k_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, thousands commas removed; None if absent."""
    marker = solution.rfind("####")
    if marker < 0:
        return None
    answer = solution[marker + 4 :].strip().replace(",", "")
    return answer or None


def normalize(answer: str) -> str:
    """A canonical surface form: no ``$``/boxes/spacing macros/degree signs/text wrappers, units dropped.

    Only changes that cannot turn a wrong answer into a right one: ``\\text{cm}`` after a number goes,
    ``\\text{Evelyn}`` becomes ``Evelyn``, ``\\$18`` becomes ``18``. Percent signs are kept: whether
    ``%`` matters depends on the reference (see ``data.equivalence``).
    """
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None and s.lstrip().startswith("\\boxed"):
        s = boxed
    s = s.strip().strip("$").strip()
    for noise in _NOISE:
        if noise in ("\\tfrac", "\\dfrac"):
            s = s.replace(noise, "\\frac")
        else:
            s = s.replace(noise, " " if noise.startswith("\\q") else "")
    s = s.replace("\\$", "").replace("\\%", "%").replace("\\{", "{").replace("\\}", "}")
    s = _DEGREE_RE.sub("", s)
    # A trailing text macro after something else is a unit ("10\text{ cm}"); a lone one is the answer.
    m = re.match(r"^(.*?\S)\s*\\(?:text|mbox|mathrm|textrm)\s*\{[^{}]*\}$", s)
    if m and re.search(r"\d", m.group(1)):
        s = m.group(1)
    s = _TEXT_MACRO_RE.sub(lambda mm: mm.group(1), s)
    s = s.strip().rstrip(".").strip()
    if s.startswith("$"):
        s = s[1:].strip()
    words = _UNIT_WORDS_RE.match(s)
    if words:
        s = words.group("num")
    return " ".join(s.split())


def parse_number(answer: str) -> Fraction | None:
    """An exact value for plain numerals: ``12``, ``-1,234.50``, ``3/4``, ``\\frac{3}{4}``, ``\\frac34``, ``2e3``.

    None for anything else (expressions, symbols, percent, tuples): those are not numbers to this reader.
    Input is expected normalized (``normalize``); size is capped so huge literals never cost here.
    """
    s = answer.replace(" ", "")
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    if _PLAIN_NUMBER_RE.match(s):
        return Fraction(s.replace(",", "").rstrip(".") or "0")
    m = _SLASH_FRACTION_RE.match(s)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den != 0 else None
    m = _LATEX_FRACTION_RE.match(s)
    if m:
        num = int(m.group(2) or m.group(3))
        den = int(m.group(4) or m.group(5))
        if den == 0:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) == "-" else value
    m = _SCI_RE.match(s)
    if m and abs(int(m.group(2))) <= _MAX_SCI_EXPONENT:
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    return None


def decimal_places(answer: str) -> int | None:
    """Digits after the point when ``answer`` is a plain decimal numeral ("0.33" -> 2), else None."""
    s = answer.replace(" ", "").replace(",", "")
    if _PLAIN_NUMBER_RE.match(s) and "." in s:
        return len(s.split(".", 1)[1])
    return None
