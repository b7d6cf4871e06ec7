"""``python -m pipeline eval RUN_DIR --round N --problems FILE [--json]`` on a user's problem file."""

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def run_dir(tmp_path):
    # The tiny preset with the tiny random model as bootstrap too: loading and decoding take seconds.
    cfg = load_config(CONFIGS / "tiny.yaml", ["engines.bootstrap_model=tiny-random", "search.max_depth=2",
                                               "engines.generation.max_new_tokens_step=8"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


@pytest.mark.parametrize("name,content,why", [
    ("missing.jsonl", None, "no such file"),
    ("probs.txt", "what is 1+1?\n", "unsupported file type '.txt'"),
    ("probs.jsonl", '{"foo": 1}\nnot json\n', "no usable problems"),
    ("probs.parquet", "this is not parquet", "not a readable Parquet file"),
])
def test_a_bad_problem_file_is_one_line_and_exit_2(run_dir, tmp_path, capsys, name, content, why):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert main(["eval", str(run_dir), "--round", "0", "--problems", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --problems {path}: ") and why in err, err


def test_not_a_run_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--round", "0", "--problems", "x.jsonl"]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow  # a local Ray cluster and the tiny model: ~25 s on 2 cores
def test_round_0_on_a_jsonl_file_prints_json_last(run_dir, tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "b", "question": "What is 4 * 2?", "answer": "8"},
            {"id": "c", "question": "What is 9 - 6?", "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run_dir), "--round", "0", "--problems", str(path), "--json", "--greedy-only"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["n"] == 3 and summary["round"] == 0
    assert summary["greedy_correct"] in range(4)
    assert summary["greedy_pass1"] == pytest.approx(summary["greedy_correct"] / 3)
    assert summary["maj_at_k"] is None and "greedy only" in summary["skipped"]["maj_at_k"]
    stored = json.loads((run_dir / "round_0" / "eval_bench" / "eval.json").read_text())
    assert [p["id"] for p in stored["problems"]] == ["a", "b", "c"]
    assert not (run_dir / "round_0" / "eval.json").exists(), "a user's file must not replace the held-out eval"
