"""Problems and answer grading: where questions come from and how answers are judged.

The stable surface other packages call (keep these signatures):

* ``load_problems(source, **options) -> list[Problem]``: ``builtin:arithmetic`` / ``builtin:countdown``
  (n, seed, difficulty), a .jsonl/.json/.parquet/.csv file, or a Hugging Face dataset name.
* ``extract_answer(text) -> str | None``: the last ``\\boxed{}`` (nesting-aware); ``last_boxed(text)``.
* ``is_equivalent(prediction, reference) -> bool`` and ``grade(problem, prediction) -> bool`` (the
  search's Grader), ``grade_detailed`` / ``grade_many`` with reasons.

Nothing heavy is imported here: math-verify and sympy load only in the grading worker processes,
``datasets`` only when a hub dataset is requested.
"""

from data.adapters import FieldMap, Rejected
from data.answers import extract_answer, last_boxed, last_number, normalize
from data.expression import ExpressionError, evaluate
from data.generators import GENERATORS, generate_arithmetic, generate_countdown, solve
from data.grading import (
    Grade,
    Grader,
    GradingConfig,
    configure,
    default_grader,
    grade,
    grade_countdown,
    grade_detailed,
    grade_many,
    is_equivalent,
    shutdown,
)
from data.grading_pool import GradingWorkerError
from data.loaders import (
    LoadResult,
    ProblemsConfig,
    ProblemSourceError,
    load_problems,
    load_problems_config,
    load_problems_with_report,
    write_rejected,
)
from data.problem import KIND_COUNTDOWN, KIND_MATH, Problem, content_id

__all__ = [
    "GENERATORS",
    "KIND_COUNTDOWN",
    "KIND_MATH",
    "ExpressionError",
    "FieldMap",
    "Grade",
    "Grader",
    "GradingConfig",
    "GradingWorkerError",
    "LoadResult",
    "Problem",
    "ProblemSourceError",
    "ProblemsConfig",
    "Rejected",
    "configure",
    "content_id",
    "default_grader",
    "evaluate",
    "extract_answer",
    "generate_arithmetic",
    "generate_countdown",
    "grade",
    "grade_countdown",
    "grade_detailed",
    "grade_many",
    "is_equivalent",
    "last_boxed",
    "last_number",
    "load_problems",
    "load_problems_config",
    "load_problems_with_report",
    "normalize",
    "shutdown",
    "solve",
    "write_rejected",
]
