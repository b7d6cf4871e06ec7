"""Answer aggregation for evaluation: majority voting (maj@k) and score-based selection (best-of-N).

Both are pure functions over extracted answers; the caller supplies the equivalence test so this module
stays free of the grading machinery (production passes ``data.is_equivalent``).

Grouping for a vote is two-stage because equivalence checks can be expensive (math-verify runs in worker
processes): answers are first merged by a cheap normal form (``normalise``: whitespace, surrounding
``$``, a trailing ``.`` and ``\\text{}``/``\\left``/``\\right`` wrappers removed, and numbers written
the same way, e.g. ``"4.0"`` and ``"4"``), and only one representative per normal form is then compared
with ``equivalent``. With k samples that is at most k*(k-1)/2 equivalence calls, usually far fewer.

Ties are broken by first appearance, so a vote is deterministic given the sample order (sample i is the
chain seeded with index i).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

Equivalent = Callable[[str, str], bool]

_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_SIZING = re.compile(r"\\(?:left|right)(?=[()\[\]|.])")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


def normalise(answer: str) -> str:
    """A cheap canonical form: equal forms are certainly equivalent; unequal forms may still be."""
    s = answer.strip()
    s = s.strip("$").strip()
    s = _WRAPPERS.sub(r"\1", s)
    s = _SIZING.sub("", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    plain = s.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s) else s
    if _NUMBER.match(plain):
        # Exact rational value, so "4.0", "4" and "+4" vote together; no float rounding involved.
        v = Fraction(plain)
        return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
    return s


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote over one problem's samples."""

    answer: str | None  # the winning group's first-seen answer; None when no sample produced an answer
    votes: int  # size of the winning group
    answered: int  # samples that produced an answer (the others do not vote)
    groups: int  # distinct answers after grouping


def majority_vote(answers: Sequence[str | None], equivalent: Equivalent | None = None) -> Vote:
    """Group ``answers`` (None = no answer, does not vote) and return the largest group; ties: first seen.

    ``equivalent(a, b)`` merges groups whose normal forms differ (e.g. ``"1/2"`` and ``"0.5"``); with
    None only the normal form groups.
    """
    reps: list[str] = []  # first-seen original answer of each group
    forms: list[str] = []  # its normal form
    counts: list[int] = []
    by_form: dict[str, int] = {}
    answered = 0
    for a in answers:
        if a is None:
            continue
        answered += 1
        form = normalise(a)
        idx = by_form.get(form)
        if idx is None and equivalent is not None:
            idx = next((i for i, r in enumerate(reps) if equivalent(a, r)), None)
        if idx is None:
            idx = len(reps)
            reps.append(a)
            forms.append(form)
            counts.append(0)
        by_form.setdefault(form, idx)
        counts[idx] += 1
    if not reps:
        return Vote(answer=None, votes=0, answered=0, groups=0)
    # max() returns the first maximal index: the tie rule "first seen" for free.
    best = max(range(len(reps)), key=lambda i: counts[i])
    return Vote(answer=reps[best], votes=counts[best], answered=answered, groups=len(reps))


@dataclass(frozen=True)
class Pick:
    """The outcome of best-of-N selection over one problem's samples."""

    answer: str | None  # the chosen sample's answer; None when no sample produced an answer
    score: float | None  # its score
    index: int | None  # its position among the samples


def best_scored(answers: Sequence[str | None], scores: Sequence[float | None]) -> Pick:
    """The answered sample with the highest score (None score = not scored); ties: lowest index."""
    if len(answers) != len(scores):
        raise ValueError(f"best_scored: {len(answers)} answers but {len(scores)} scores; they must pair up")
    best: int | None = None
    for i, (a, s) in enumerate(zip(answers, scores, strict=True)):
        if a is None or s is None:
            continue
        if best is None or s > scores[best]:  # strict '>' keeps the lowest index on ties
            best = i
    if best is None:
        return Pick(answer=None, score=None, index=None)
    return Pick(answer=answers[best], score=scores[best], index=best)
