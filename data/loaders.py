"""Problems from anywhere: built-in generators, JSONL/JSON/Parquet/CSV files, Hugging Face datasets.

``load_problems(source, **options)`` picks the reader from the source (``builtin:NAME``, an existing
file by its extension, ``hf:NAME`` or any other name as a hub dataset), then turns each row into a
``Problem`` through the adapter its fields call for (``data.adapters``). A row that cannot be used
is skipped and reported (``Rejected``: row, id, reason; written as JSONL to ``rejected_path``); a
source that cannot be read at all raises ``ProblemSourceError`` before any work starts.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data.adapters import FieldMap, Rejected, adapt_row
from data.atomic_io import atomic_write_text
from data.generators import GENERATORS
from data.problem import Problem

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


class ProblemSourceError(ValueError):
    """A problem source that cannot be used at all: the message says which, why and what to do."""


@dataclass(frozen=True)
class ProblemsConfig:
    """Where a run's problems come from (training set and held-out evaluation set)."""

    source: str = "builtin:arithmetic"  # builtin:arithmetic | builtin:countdown | a file | an HF dataset name
    n: int | None = 256  # problems to use (None: all rows of a file/dataset; generators need a number)
    seed: int = 0  # generators only: the same seed gives the same problems
    difficulty: int | None = None  # generators: 1..6 or None for a mix; files: keep rows of this level only
    question_field: str | None = None  # column holding the question (None: detect question/problem)
    answer_field: str | None = None  # column holding the answer or solution (None: detect answer/solution)
    split: str = "train"  # HF datasets only
    subset: str | None = None  # HF dataset configuration name, e.g. "main" for openai/gsm8k
    fallback_last_number: bool = False  # a reference solution without \boxed{}/####: use its last number
    # None: a generator holds out problems from another seed; a file/dataset holds out its last eval_n rows.
    eval_source: str | None = None
    eval_n: int | None = 64  # None: every row of eval_source
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ValueError("problems.source='': must name a built-in generator, a file or a dataset")
        for name in ("n", "eval_n"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"problems.{name}={value}: must be >= 1 or None (all rows)")
        if self.difficulty is not None and not 1 <= self.difficulty <= 6:
            raise ValueError(f"problems.difficulty={self.difficulty}: must be 1..6 or None (a mix)")
        if self.source.startswith(BUILTIN_PREFIX):
            name = self.source[len(BUILTIN_PREFIX) :]
            if name not in GENERATORS:
                raise ValueError(f"problems.source={self.source!r}: unknown generator; known: "
                                 + ", ".join(BUILTIN_PREFIX + g for g in sorted(GENERATORS)))
            if self.n is None:
                raise ValueError(f"problems.n=None: a generator ({self.source}) needs a number of problems")
            if self.eval_source is None and self.eval_n is None:
                raise ValueError(f"problems.eval_n=None: a generator ({self.source}) needs a number of "
                                 "held-out problems")


@dataclass(frozen=True)
class LoadResult:
    problems: list[Problem]
    rejected: list[Rejected]


# ---- readers: each yields plain dict rows ----------------------------------------------------------------


# Readers yield (position in the source, row): the rejected-rows report names rows by that position.
Rows = Iterable[tuple[int, dict[str, Any]]]


def _read_jsonl(path: Path, bad: list[Rejected]) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(Rejected(row=lineno - 1, id=None, reason=f"line {lineno}: invalid JSON: {exc.msg}"))
                continue
            if not isinstance(row, dict):
                bad.append(Rejected(row=lineno - 1, id=None, reason=f"line {lineno}: not a JSON object"))
                continue
            yield lineno - 1, row


def _read_json(path: Path, bad: list[Rejected]) -> Rows:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name: read it as JSONL
            return list(_read_jsonl(path, bad))
        raise ProblemSourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                                 "expected a JSON list of objects or JSON lines") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ProblemSourceError(f"{path}: a JSON object, not a list; expected a list of problem objects "
                                     "(or an object with exactly one list in it)")
        data = lists[0]
    if not isinstance(data, list):
        raise ProblemSourceError(f"{path}: JSON {type(data).__name__}; expected a list of problem objects")
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, dict):
            rows.append((i, row))
        else:
            bad.append(Rejected(row=i, id=None, reason=f"item {i} is a {type(row).__name__}, not an object"))
    return rows


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist()))
    except Exception as exc:  # pyarrow raises several types for a damaged file; all mean "unreadable"
        raise ProblemSourceError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc


def _read_csv(path: Path) -> Rows:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ProblemSourceError(f"{path}: CSV without a header row; the first line must name the columns")
        return list(enumerate(reader))


def _read_file(path: Path, bad: list[Rejected]) -> Rows:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, bad)
    if suffix == ".json":
        return _read_json(path, bad)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise ProblemSourceError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_FORMATS)}")


def _read_hf(name: str, subset: str | None, split: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, bad split: all become one actionable error
        raise ProblemSourceError(
            f"could not load the Hugging Face dataset {name!r} (subset {subset!r}, split {split!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Loading a hub dataset needs "
            "network access to huggingface.co (or a local datasets cache); without it, export the split to "
            "a .jsonl/.json/.parquet/.csv file and pass its path as the source."
        ) from exc
    return enumerate(dataset)


# ---- the public entry point ----------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    # "owner/name" is a hub dataset; "./x", "/data/x.jsonl", "x.csv" are files someone meant to pass.
    return source.lower().endswith(FILE_FORMATS) or source.startswith(("/", "./", "../", "~"))


def load_problems_with_report(
    source: str,
    *,
    n: int | None = None,
    seed: int = 0,
    difficulty: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    subset: str | None = None,
    fallback_last_number: bool = False,
) -> LoadResult:
    """``load_problems`` that also returns the rejected rows instead of writing them."""
    if n is not None and n < 1:
        raise ProblemSourceError(f"n={n}: must be >= 1 or None (all rows)")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in GENERATORS:
            known = ", ".join(BUILTIN_PREFIX + g for g in sorted(GENERATORS))
            raise ProblemSourceError(f"unknown built-in problem source {source!r}; known: {known}")
        if n is None:
            raise ProblemSourceError(f"{source}: a generator needs n (how many problems)")
        return LoadResult(GENERATORS[name](n, seed=seed, difficulty=difficulty), [])

    bad: list[Rejected] = []
    path = Path(source).expanduser()
    if source.startswith(HF_PREFIX):
        rows: Rows = _read_hf(source[len(HF_PREFIX) :], subset, split)
    elif path.is_file():
        rows = _read_file(path, bad)
    elif path.exists():
        raise ProblemSourceError(f"{source}: is a directory; pass one {'/'.join(FILE_FORMATS)} file")
    elif _looks_like_path(source):
        raise ProblemSourceError(f"{source}: no such file (working directory {os.getcwd()})")
    else:
        rows = _read_hf(source, subset, split)

    fields = FieldMap(question=question_field, answer=answer_field)
    problems: list[Problem] = []
    seen: set[str] = set()
    total = 0
    for index, row in rows:
        total += 1
        adapted = adapt_row(row, index, source, fields, fallback_last_number)
        if isinstance(adapted, Rejected):
            bad.append(adapted)
            continue
        if adapted.id in seen:
            bad.append(Rejected(row=index, id=adapted.id, reason="duplicate id (an earlier row has it)"))
            continue
        if difficulty is not None and adapted.difficulty != difficulty:
            continue
        seen.add(adapted.id)
        problems.append(adapted)
        if n is not None and len(problems) >= n:
            break
    total += sum(1 for r in bad if r.id is None and r.reason.startswith(("line ", "item ")))  # unreadable rows
    if not problems:
        reasons = "; ".join(sorted({r.reason for r in bad})[:3]) or "no rows"
        raise ProblemSourceError(f"{source}: no usable problems in {total} rows ({reasons}); "
                                 "check the file, or set problems.question_field / problems.answer_field")
    if bad:
        log.warning("%s: skipped %d of %d rows (see the rejected-rows report)", source, len(bad), total)
    return LoadResult(problems, bad)


def write_rejected(rejected: list[Rejected], path: str | os.PathLike, source: str) -> None:
    """The rejected-rows report as JSONL, written to a temp name and renamed (never half-written)."""
    atomic_write_text(path, "".join(json.dumps({"source": source, **asdict(r)}) + "\n" for r in rejected))


def load_problems(source: str, *, rejected_path: str | os.PathLike | None = None, **options: Any) -> list[Problem]:
    """Problems from ``source`` (module doc); options: n, seed, difficulty, question_field, answer_field,
    split, subset, fallback_last_number. With ``rejected_path`` the skipped rows are written there as JSONL.
    """
    result = load_problems_with_report(source, **options)
    if rejected_path is not None:
        write_rejected(result.rejected, rejected_path, source)
    return result.problems


REJECTED_TRAIN = "rejected_problems.jsonl"
REJECTED_EVAL = "rejected_eval_problems.jsonl"


def _options(config: ProblemsConfig) -> dict[str, Any]:
    return dict(question_field=config.question_field, answer_field=config.answer_field, subset=config.subset,
                fallback_last_number=config.fallback_last_number)


def load_problems_config(
    config: ProblemsConfig, rejected_dir: str | os.PathLike | None = None
) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) as ``config`` names them, never sharing a question.

    With ``rejected_dir`` the skipped rows go to ``rejected_problems.jsonl`` / ``rejected_eval_problems.jsonl``
    there. Held-out set: ``eval_source`` if given; else a generator's problems under another seed, or
    for a file/dataset its last ``eval_n`` usable rows (at most half of them), kept out of training.
    """
    where = Path(rejected_dir) if rejected_dir is not None else None
    train_report = where / REJECTED_TRAIN if where is not None else None
    if config.source.startswith(BUILTIN_PREFIX):
        train = load_problems(config.source, rejected_path=train_report, n=config.n, seed=config.seed,
                              difficulty=config.difficulty)
    elif config.eval_source is None:
        result = load_problems_with_report(
            config.source, n=None if config.n is None or config.eval_n is None else config.n + config.eval_n,
            difficulty=config.difficulty, split=config.split, **_options(config))
        if train_report is not None:
            write_rejected(result.rejected, train_report, config.source)
        rows = result.problems
        held = min(config.eval_n or len(rows) // 2, len(rows) // 2)
        if held < 1:
            raise ProblemSourceError(f"{config.source}: {len(rows)} usable rows; too few to hold out an eval set "
                                     "(set problems.eval_source)")
        return rows[: len(rows) - held][: config.n], rows[len(rows) - held :]
    else:
        train = load_problems(config.source, rejected_path=train_report, n=config.n, difficulty=config.difficulty,
                              split=config.split, **_options(config))
    return train, _held_out(config, train, where / REJECTED_EVAL if where is not None else None)


def _held_out(config: ProblemsConfig, train: list[Problem], rejected_path: Path | None) -> list[Problem]:
    train_questions = {p.question for p in train}
    if config.eval_source is None:
        # Another seed stream of the same generator; at difficulty 1 a question can still repeat, so drop those.
        want = config.eval_n or 64
        n = 2 * want + 32
        while True:
            candidates = load_problems(config.source, n=n, seed=config.seed + 1_000_003, difficulty=config.difficulty)
            held_out = [p for p in candidates if p.question not in train_questions]
            if len(held_out) >= want or n > 64 * want:
                return held_out[:want]
            n *= 4
    if config.eval_source.startswith(BUILTIN_PREFIX):
        problems = load_problems(config.eval_source, rejected_path=rejected_path, n=config.eval_n or 64,
                                 seed=config.seed + 1_000_003, difficulty=config.difficulty)
    else:
        problems = load_problems(config.eval_source, rejected_path=rejected_path, n=config.eval_n,
                                 split=config.eval_split, **_options(config))
    return [p for p in problems if p.question not in train_questions]
