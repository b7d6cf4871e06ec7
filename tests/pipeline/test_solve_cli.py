"""``python -m pipeline solve``: one-line errors with exit 2, the strategy list, and the tiny model end to end."""

import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from rounds.solve import COLUMNS


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "probs.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "b", "question": "What is 4 * 2?", "answer": "8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_list_strategies(capsys):
    assert main(["solve", "--list-strategies"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["greedy", "majority", "weighted_majority", "best_of_n", "beam", "dvts", "mcts", "auto"]


@pytest.mark.parametrize("extra,why", [
    (["--strategy", "bogus"], "unknown strategy 'bogus'; choose one of: greedy,"),
    (["--budget", "0"], "--budget '0': must be"),
    (["--budget", "many"], "--budget 'many': must be"),
    (["--sweep", "1,0"], "--sweep '1,0': must be"),
    (["--sweep", "1,2", "--strategies", "majority,nope"], "unknown strategy 'nope'"),
    (["--strategy", "auto"], "--strategy auto needs --calibration FILE"),
    (["--strategy", "beam"], "strategy 'beam' needs a PPM"),
    (["--expansion", "0"], "--expansion, --batch and --probe must be >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_2(problems, tmp_path, capsys, extra, why):
    argv = ["solve", "--policy", "tiny-random", "--problems", str(problems), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and why in err, err


def test_bad_sources_exit_2(problems, tmp_path, capsys):
    assert main(["solve", "--run", str(tmp_path), "--round", "1", "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["solve", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--run needs --round N" in capsys.readouterr().err
    assert main(["solve", "--policy", "tiny-random", "--problems", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tiny_model_sweep_end_to_end(problems, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["solve", "--policy", "tiny-random", "--problems", str(problems), "--out", str(out),
            "--sweep", "1,2", "--strategies", "greedy,majority", "--verify",
            "--set", "engines.generation.max_new_tokens_step=8", "--set", "search.max_depth=2"]
    assert main(argv) == 0
    table = pq.read_table(out / "results.parquet")
    assert tuple(table.column_names) == COLUMNS
    rows = table.to_pylist()
    # greedy runs at the first budget only: greedy@1, majority@1, majority@2, 2 problems each
    assert [(r["strategy"], r["budget"]) for r in rows] == [("greedy", 1), ("greedy", 1), ("majority", 1),
                                                            ("majority", 1), ("majority", 2), ("majority", 2)]
    assert all(r["tokens"] > 0 for r in rows), rows  # the tiny model always generates something
    assert all(r["correct"] is not None for r in rows)
    assert (out / "scaling.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "majority" in text and "tokens/prob" in text
