"""Priming data: trajectories from a file that join round 1's SFT rows (``search.extract.priming_file``).

Gandhi et al. (2025) find that priming a model with trajectories that show verification and backtracking -
even ones that reach a wrong answer - lets self-improvement take off where it otherwise stalls. Here such
trajectories come from a ``.jsonl`` file, one object per line:

    {"question": "Using the numbers 8, 3, 5, make 19. ...", "completion": "# 8 + 3 + 5 = 16, not 19. ...\\n<end_of_step>\\n...",
     "problem_id": "optional"}

``completion`` is a solution in the step format (``mcts.steps``: comment lines + code, ``# output:`` lines,
``<end_of_step>`` / ``<end_of_answer>``), exactly what an ``sft.parquet`` completion holds. Each is tagged with
``mcts.behaviours``; only those showing one of ``priming_behaviours`` are kept (the rest are counted as skipped),
and they become SFT rows with ``leaf_id = -1`` and ``q_mean = q_min = 0`` (no search scored them). A line that is
not a JSON object with non-empty string ``question`` and ``completion`` is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mcts.behaviours import StepText, behaviours_of, tag_trajectory
from mcts.steps import OUTPUT_PREFIX, split_steps


class PrimingError(ValueError):
    """The priming file is missing or malformed; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Primed:
    rows: list[dict]  # sft rows (data.schemas.SFT_SCHEMA)
    read: int  # trajectories in the file
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def summary(self) -> dict:
        return {"read": self.read, "added": len(self.rows), "skipped": dict(self.skipped)}


def completion_steps(completion: str) -> list[StepText]:
    """The steps of a rendered completion, each with its ``# output:`` lines moved to ``output``."""
    steps = []
    for raw in split_steps(completion):
        lines = raw.splitlines()
        out = [ln.strip()[len(OUTPUT_PREFIX):] for ln in lines if ln.strip().startswith(OUTPUT_PREFIX.strip())]
        text = "\n".join(ln for ln in lines if not ln.strip().startswith(OUTPUT_PREFIX.strip()))
        steps.append(StepText(text, "\n".join(out)))
    return steps


def load_priming(path: str | Path, behaviours: Sequence[str], prompt_fn: Callable[[str, str], str],
                 round: int = 1) -> Primed:
    """Read, tag and filter the priming file into SFT rows (see module doc)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrimingError(f"search.extract.priming_file={str(path)!r}: file not found; give a .jsonl of "
                           f"{{question, completion}} trajectories or set it to ''")
    wanted = set(behaviours)
    rows: list[dict] = []
    skipped: dict[str, int] = {}
    read = 0
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrimingError(f"{p}:{lineno}: not JSON ({e.msg}); each line is one {{question, completion}} "
                               f"object") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                                for k in ("question", "completion")):
            raise PrimingError(f"{p}:{lineno}: needs non-empty string fields 'question' and 'completion'")
        read += 1
        steps = completion_steps(obj["completion"])
        tags = behaviours_of(tag_trajectory(steps, obj["question"]))
        if not wanted.intersection(tags):
            reason = f"shows none of {', '.join(sorted(wanted))}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        pid = obj.get("problem_id") or "primed-" + hashlib.sha256(
            (obj["question"] + "\x1f" + obj["completion"]).encode()).hexdigest()[:12]
        rows.append({"prompt": prompt_fn(obj["question"], ""), "completion": obj["completion"],
                     "problem_id": str(pid), "question": obj["question"], "round": round, "q_mean": 0.0,
                     "q_min": 0.0, "n_steps": len(steps), "leaf_id": -1, "behaviours": tags})
    return Primed(rows, read, skipped)


__all__ = ["Primed", "PrimingError", "completion_steps", "load_priming"]
