"""data.loaders + data.adapters on fixture files the tests write: each format, each adapter, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.loaders import (
    REJECTED_EVAL,
    REJECTED_TRAIN,
    ProblemsConfig,
    ProblemSourceError,
    load_problems,
    load_problems_config,
    load_problems_with_report,
)
from data.problem import KIND_COUNTDOWN

BENCHMARKS = Path("/work/shared/data/benchmarks")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_jsonl_with_bad_rows_and_report(tmp_path):
    src = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = 13\n#### 13"},
        {"question": "A farm sells 1250 eggs. How many?", "answer": "It sells 1,250.\n#### 1,250"},
        "{not json",
        {"answer": "#### 4"},  # no question
        {"question": "What?", "answer": "#### "},  # nothing after the marker
    ])
    report = tmp_path / "out" / "rejected.jsonl"
    problems = load_problems(str(src), rejected_path=report)
    assert [p.answer for p in problems] == ["13", "1250"]  # thousands comma dropped
    assert problems[0].id.startswith("gsm8k-") and problems[0].meta["format"].endswith("(gsm8k ####)")
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["row"] for r in rows] == [2, 3, 4]
    assert "invalid JSON" in rows[0]["reason"] and "no question" in rows[1]["reason"]
    assert "nothing after '####'" in rows[2]["reason"] and rows[0]["source"] == str(src)


def test_math_json_list_solution_with_boxed_and_levels(tmp_path):
    src = tmp_path / "math.json"
    src.write_text(json.dumps([
        {"problem": "Compute 1/2.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3", "type": "Algebra"},
        {"problem": "Unclosed", "solution": "so \\boxed{\\frac{1}{2}", "level": "Level 1"},
        {"problem": "Tuple", "solution": "We get \\boxed{(1, 2)}.", "level": "Level 5"},
    ]))
    result = load_problems_with_report(str(src))
    assert [(p.answer, p.difficulty) for p in result.problems] == [("\\frac{1}{2}", 3), ("(1, 2)", 5)]
    assert result.problems[0].meta["type"] == "Algebra"
    assert len(result.rejected) == 1 and "unclosed" in result.rejected[0].reason
    # difficulty filters rows by their level
    assert [p.answer for p in load_problems(str(src), difficulty=5)] == ["(1, 2)"]


def test_math500_style_answer_field_and_ids(tmp_path):
    src = _jsonl(tmp_path / "m500.jsonl", [
        {"problem": "p1", "solution": "long... \\boxed{3}", "answer": "3", "unique_id": "test/algebra/1.json"},
        {"problem": "p2", "answer": "\\text{Evelyn}", "unique_id": "test/algebra/2.json"},
        {"problem": "p3", "answer": "4", "unique_id": "test/algebra/1.json"},  # duplicate id
    ])
    result = load_problems_with_report(str(src))
    assert [(p.id, p.answer) for p in result.problems] == [("test/algebra/1.json", "3"), ("test/algebra/2.json", "\\text{Evelyn}")]
    assert result.rejected[0].reason.startswith("duplicate id")


def test_numina_parquet_and_last_number_fallback(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "numina.parquet"
    pq.write_table(pa.table({
        "problem": ["Find x.", "Find y."],
        "solution": ["Thus $x = \\boxed{7}$.", "Step one.\nSo y equals 12 in the end."],
    }), src)
    strict = load_problems_with_report(str(src))
    assert [p.answer for p in strict.problems] == ["7"]
    assert "fallback_last_number" in strict.rejected[0].reason  # says how to accept it
    assert [p.answer for p in load_problems(str(src), fallback_last_number=True)] == ["7", "12"]


def test_csv_with_a_column_mapping(tmp_path):
    src = tmp_path / "mine.csv"
    src.write_text("prompt_text,gold,extra\nWhat is 2+3?,5,x\nWhat is 10/4?,5/2,y\n,3,z\n", encoding="utf-8")
    result = load_problems_with_report(str(src), question_field="prompt_text", answer_field="gold")
    assert [(p.question, p.answer) for p in result.problems] == [("What is 2+3?", "5"), ("What is 10/4?", "5/2")]
    assert len(result.rejected) == 1 and "no question" in result.rejected[0].reason
    with pytest.raises(ProblemSourceError, match="no field 'nope'"):
        load_problems(str(src), question_field="prompt_text", answer_field="nope")


def test_countdown_rows_become_countdown_problems(tmp_path):
    src = _jsonl(tmp_path / "cd.jsonl", [{"nums": [3, 7, 25], "target": 46}, {"numbers": "[1, 2]", "target": "x"}])
    result = load_problems_with_report(str(src))
    (p,) = result.problems
    assert p.kind == KIND_COUNTDOWN and p.meta["numbers"] == [3, 7, 25] and p.answer == "46"
    assert "integer" in result.rejected[0].reason


def test_n_takes_the_first_usable_rows(tmp_path):
    src = _jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(10)])
    assert [p.answer for p in load_problems(str(src), n=3)] == ["0", "1", "2"]


def test_json_lines_under_a_json_name(tmp_path):
    src = _jsonl(tmp_path / "rows.json", [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    assert len(load_problems(str(src))) == 2


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, "no such file"),
        ("data.txt", "hello", "unsupported file type '.txt'"),
        ("broken.json", "[{\"question\": ", "not valid JSON"),
        ("scalar.json", "42", "expected a list"),
        ("empty.jsonl", "\n\n", "no usable problems"),
        ("nofields.jsonl", "{\"foo\": 1}\n", "no usable problems"),
        ("bad.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_unusable_sources_fail_before_work(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProblemSourceError, match=match):
        load_problems(str(path))


def test_builtin_sources():
    problems = load_problems("builtin:arithmetic", n=5, seed=1, difficulty=2)
    assert len(problems) == 5 and {p.difficulty for p in problems} == {2}
    assert load_problems("builtin:countdown", n=3, seed=0)[0].kind == KIND_COUNTDOWN
    with pytest.raises(ProblemSourceError, match="known: builtin:arithmetic, builtin:countdown"):
        load_problems("builtin:nope", n=1)


def test_hf_dataset_offline_is_a_clear_error():
    # A real datasets.load_dataset call; offline mode makes the hub failure immediate instead of retrying.
    code = ("from data import load_problems\n"
            "try:\n    load_problems('someone/some-math-set', split='test')\n"
            "except Exception as e:\n    print(type(e).__name__, '|', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("ProblemSourceError |"), out
    assert "'someone/some-math-set'" in out and "network" in out and ".jsonl" in out


def test_config_validation_and_composition(tmp_path):
    with pytest.raises(ValueError, match="problems.n=0: must be >= 1"):
        ProblemsConfig(n=0)
    with pytest.raises(ValueError, match="problems.difficulty=9"):
        ProblemsConfig(difficulty=9)
    with pytest.raises(ValueError, match="unknown generator"):
        ProblemsConfig(source="builtin:sudoku")

    train, held = load_problems_config(ProblemsConfig(n=30, eval_n=10, difficulty=1))
    assert len(train) == 30 and len(held) == 10
    assert not {p.question for p in train} & {p.question for p in held}  # held out for real

    src = _jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(10)] + ["{bad"])
    train, held = load_problems_config(ProblemsConfig(source=str(src), n=None, eval_n=3), rejected_dir=tmp_path)
    assert [p.answer for p in train] == [str(i) for i in range(7)] and [p.answer for p in held] == ["7", "8", "9"]
    assert (tmp_path / REJECTED_TRAIN).read_text().count("\n") == 1

    other = _jsonl(tmp_path / "e.jsonl", [{"question": "q1", "answer": "1"}, {"question": "new", "answer": "2"}])
    train, held = load_problems_config(ProblemsConfig(source=str(src), n=5, eval_source=str(other)), tmp_path)
    assert len(train) == 5 and [p.question for p in held] == ["new"]  # q1 is a training question
    assert (tmp_path / REJECTED_EVAL).exists()


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="public benchmark files not present")
def test_public_benchmarks_load_cleanly(grader):
    expected = {"gsm8k-openai-test.jsonl": 1319, "gsm8k-test.jsonl": 1319, "math500-rstar.json": 500,
                "aime24-test.jsonl": 30}
    for name, count in expected.items():
        result = load_problems_with_report(str(BENCHMARKS / name))
        assert len(result.problems) == count and not result.rejected, (name, result.rejected[:3])
    gsm = load_problems(str(BENCHMARKS / "gsm8k-openai-test.jsonl"))
    assert gsm[0].answer == "18"  # Janet's ducks
    # Every MATH-500 reference must be graded equal to itself (LaTeX, text, tuples, bases alike).
    math500 = load_problems(str(BENCHMARKS / "math500-rstar.json"))
    grades = grader.grade_many(math500, [p.answer for p in math500])
    wrong = [(p.answer, g.reason) for p, g in zip(math500, grades, strict=True) if not g.correct]
    assert not wrong, wrong[:5]
