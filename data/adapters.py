"""Rows as people have them -> Problem: GSM8K, MATH / MATH-500 / AIME, NuminaMath, Countdown, any columns.

The format is read off the fields a row has (or the ``question_field``/``answer_field`` the user
named), so one file may even mix layouts. A row that cannot become a problem is a ``Rejected`` with
its index, id (when known) and the reason, never an exception: one bad row must not stop a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from data.answers import gsm8k_answer, last_boxed, last_number
from data.generators.countdown import countdown_question
from data.problem import KIND_COUNTDOWN, Problem, content_id

QUESTION_FIELDS = ("question", "problem", "Question", "Problem", "query")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "Answer", "gt")
SOLUTION_FIELDS = ("solution", "Solution", "response")
ID_FIELDS = ("id", "unique_id", "problem_id", "idx", "index", "ID")
META_FIELDS = ("level", "subject", "type", "url", "source")
MAX_PLAIN_ANSWER_CHARS = 200  # a longer answer field without \boxed{} or #### is a solution, not an answer


@dataclass(frozen=True)
class FieldMap:
    """User-named columns (``--set problems.question_field=...``); None means detect."""

    question: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class Rejected:
    """A skipped row: its 0-based position in the source, its id if it had one, and why."""

    row: int
    id: str | None
    reason: str


def reference_answer(raw: Any, fallback_last_number: bool) -> tuple[str | None, str]:
    """(final answer, how it was found) from an answer or solution field; (None, why not) when impossible."""
    if isinstance(raw, bool) or raw is None:
        return None, f"answer is {raw!r}"
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)  # parquet/CSV readers turn 18 into 18.0
    text = str(raw).strip()
    if not text:
        return None, "empty answer"
    if "####" in text:
        found = gsm8k_answer(text)
        return (found, "gsm8k ####") if found else (None, "nothing after '####'")
    if "\\boxed" in text:
        found = last_boxed(text)
        return (found, "\\boxed{}") if found else (None, "unclosed or empty \\boxed{} in the answer")
    if "\n" not in text and len(text) <= MAX_PLAIN_ANSWER_CHARS:
        return text, "answer field"
    if fallback_last_number:
        found = last_number(text)
        return (found, "last number") if found else (None, "no number in the solution text")
    return None, ("answer looks like a worked solution without \\boxed{} or ####; "
                  "set problems.fallback_last_number=true to take its last number")


def _first(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return name, value
    return None, None


def _difficulty(row: dict[str, Any]) -> int | None:
    level = row.get("difficulty", row.get("level"))
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        digits = "".join(ch for ch in level if ch.isdigit())
        return int(digits) if digits and len(digits) <= 2 else None  # "Level 3" -> 3, "Level ?" -> None
    return None


def _countdown(row: dict[str, Any], index: int, source: str) -> Problem | Rejected:
    numbers = row.get("nums", row.get("numbers"))
    if isinstance(numbers, str):
        try:
            numbers = json.loads(numbers)  # CSV cells hold "[3, 7, 25]"
        except json.JSONDecodeError:
            return Rejected(index, None, f"countdown numbers {numbers!r} are not a JSON list")
    try:
        numbers = [int(x) for x in numbers]
        target = int(row["target"])
    except (TypeError, ValueError) as exc:
        return Rejected(index, None, f"countdown row needs integer numbers and target ({exc})")
    if not 2 <= len(numbers) <= 8:
        return Rejected(index, None, f"countdown row has {len(numbers)} numbers; 2..8 supported")
    question = countdown_question(numbers, target)
    _, given_id = _first(row, ID_FIELDS)
    return Problem(
        id=str(given_id) if given_id is not None else content_id(source, question, str(target)),
        question=question, answer=str(target), source=source, difficulty=min(len(numbers) - 2, 6),  # 3 numbers ~ level 1 .. 6+ ~ level 6
        meta={"kind": KIND_COUNTDOWN, "numbers": numbers, "format": "countdown"},
    )


def _no_field(row: dict[str, Any], index: int, row_id: str | None, name: str, key: str) -> Rejected | None:
    """The rejection for a row that lacks the field the config ``key`` names, None when it has it."""
    if name in row:
        return None
    return Rejected(index, row_id, f"no field {name!r} ({key}); the row has: {', '.join(map(str, row))}")


def adapt_row(
    row: dict[str, Any], index: int, source: str, fields: FieldMap, fallback_last_number: bool
) -> Problem | Rejected:
    """One source row as a Problem, or the reason it cannot be one."""
    _, given_id = _first(row, ID_FIELDS)
    row_id = None if given_id is None else str(given_id)
    if fields.question is None and fields.answer is None and "target" in row and ("nums" in row or "numbers" in row):
        return _countdown(row, index, source)

    if fields.question is not None:
        if bad := _no_field(row, index, row_id, fields.question, "problems.question_field"):
            return bad
        q_name, question = fields.question, row[fields.question]
    else:
        q_name, question = _first(row, QUESTION_FIELDS)
    if not isinstance(question, str) or not question.strip():
        return Rejected(index, row_id, f"no question (looked for {fields.question or '/'.join(QUESTION_FIELDS)})")

    if fields.answer is not None:
        if bad := _no_field(row, index, row_id, fields.answer, "problems.answer_field"):
            return bad
        a_name, raw = fields.answer, row[fields.answer]
    else:
        a_name, raw = _first(row, ANSWER_FIELDS)
        if a_name is None:
            a_name, raw = _first(row, SOLUTION_FIELDS)
    if a_name is None:
        return Rejected(index, row_id, f"no answer (looked for {'/'.join(ANSWER_FIELDS + SOLUTION_FIELDS)})")
    answer, how = reference_answer(raw, fallback_last_number)
    if answer is None:
        return Rejected(index, row_id, f"field {a_name!r}: {how}")

    meta: dict[str, Any] = {"format": f"{q_name}+{a_name} ({how})"}
    for name in META_FIELDS:
        value = row.get(name)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            meta[name] = value
    question = question.strip()
    return Problem(
        id=row_id if row_id is not None else content_id(source, question, answer),
        question=question, answer=answer, source=source, difficulty=_difficulty(row), meta=meta,
    )
