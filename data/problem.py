"""The Problem record: one question with its reference answer, as every stage of a run sees it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

KIND_MATH = "math"  # graded by answer equivalence (data.equivalence)
KIND_COUNTDOWN = "countdown"  # graded by evaluating the submitted expression (data.expression)


def content_id(source: str, question: str, answer: str) -> str:
    """A stable id from the content: the same problem gets the same id in every run and on every machine."""
    digest = hashlib.sha256(f"{source}\x1f{question}\x1f{answer}".encode()).hexdigest()
    # A readable prefix from the source's last path part ("builtin:countdown" -> "countdown").
    stem = re.split(r"[:/\\]", source)[-1].split(".")[0]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower() or "p"
    return f"{slug}-{digest[:12]}"


@dataclass(frozen=True)
class Problem:
    """A question and its reference answer.

    ``answer`` is the final answer only (``"18"``, ``"\\frac{14}{3}"``), never a worked solution.
    A Countdown problem stores its target as ``answer`` and ``meta = {"kind": "countdown",
    "numbers": [...]}``; ``meta`` holds JSON-serialisable extras (a generator's expression, a
    dataset's level or subject) and is never needed to grade anything else.
    """

    id: str
    question: str
    answer: str
    source: str
    difficulty: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # unhashable; id & co. identify

    def __post_init__(self) -> None:
        for name in ("id", "question", "answer", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Problem.{name}={value!r}: must be a non-empty string")
        if self.difficulty is not None and (isinstance(self.difficulty, bool) or not isinstance(self.difficulty, int)):
            raise ValueError(f"Problem.difficulty={self.difficulty!r}: must be an int or None")
        if self.kind == KIND_COUNTDOWN:
            numbers = self.meta.get("numbers")
            if not isinstance(numbers, list) or not numbers or not all(isinstance(x, int) for x in numbers):
                raise ValueError(f"Problem {self.id}: countdown meta['numbers']={numbers!r}: must be a list of ints")

    @property
    def kind(self) -> str:
        """How the answer is graded: ``"countdown"`` or ``"math"`` (the default)."""
        return str(self.meta.get("kind", KIND_MATH))

    def to_dict(self) -> dict[str, Any]:
        """A flat dict for parquet/JSON; ``meta`` is a JSON string so the column type never varies by source."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "difficulty": self.difficulty,
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Problem:
        """Inverse of ``to_dict``; also accepts ``meta`` as a dict and a missing ``difficulty``/``meta``."""
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        difficulty = row.get("difficulty")
        return cls(
            id=str(row["id"]),
            question=row["question"],
            answer=str(row["answer"]),
            source=row["source"],
            difficulty=None if difficulty is None else int(difficulty),
            meta=dict(meta),
        )
