"""The policy's SFT pool: the best correct trajectories found so far for each problem, across rounds."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import SFT_SCHEMA
from rounds.sft_pool import build_sft_data, select_pool


def row(pid, completion, q_mean, q_min=0.0, rnd=1, question=None):
    return {"prompt": f"P[{question or pid}]", "completion": completion, "problem_id": pid,
            "question": question or f"question {pid}", "round": rnd, "q_mean": q_mean, "q_min": q_min,
            "n_steps": 2, "leaf_id": 7}


def write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), path)
    return path


def test_select_pool_keeps_the_best_distinct_per_problem():
    rows = [
        row("a", "a-r1-good", 0.9, rnd=1),
        row("a", "a-r2-better", 0.95, rnd=2),
        row("a", "a-r2-worse", 0.2, rnd=2),
        row("a", "a-r1-good", 0.9, rnd=2),  # the same text found again: kept once
        row("b", "b-r1", 0.5, rnd=1),  # solved only in round 1: stays in the pool
    ]
    got = select_pool(rows, top_n=2)
    assert [(r["problem_id"], r["completion"]) for r in got] == [("a", "a-r2-better"), ("a", "a-r1-good"),
                                                                   ("b", "b-r1")]
    # the duplicate's later round wins the tie (same q_mean 0.9, same q_min 0.0, round 2 > round 1)
    assert got[1]["round"] == 2
    assert select_pool(list(reversed(rows)), top_n=2) == got  # input order does not matter


def test_select_pool_ties_break_on_q_min_then_round():
    rows = [row("a", "x", 0.5, q_min=-0.5, rnd=3), row("a", "y", 0.5, q_min=0.1, rnd=1),
            row("a", "z", 0.5, q_min=0.1, rnd=2)]
    # y and z share q_min 0.1 > -0.5; z is from the later round
    assert [r["completion"] for r in select_pool(rows, top_n=3)] == ["z", "y", "x"]
    with pytest.raises(ValueError, match="top_n=0"):
        select_pool(rows, top_n=0)


def test_build_sft_data_pools_rounds_and_rerenders_prompts(tmp_path):
    r1 = write(tmp_path / "r1.parquet", [row("a", "a1", 0.8, rnd=1), row("b", "b1", 0.7, rnd=1)])
    r2 = write(tmp_path / "r2.parquet", [row("a", "a2", 0.9, rnd=2)])
    missing = tmp_path / "r3.parquet"  # a round that exported nothing
    out = tmp_path / "round_3" / "sft_train.parquet"
    info = build_sft_data([r1, r2, missing], out, top_n=1, prompt=lambda q: f"few-shot + {q}")
    assert info["rows"] == 2 and info["problems"] == 2
    table = pq.read_table(out)
    assert table.schema.equals(SFT_SCHEMA, check_metadata=False)
    data = table.to_pylist()
    assert [(d["problem_id"], d["completion"], d["prompt"]) for d in data] == [
        ("a", "a2", "few-shot + question a"), ("b", "b1", "few-shot + question b")]
    # the digest names the training data: equal rows give an equal digest, a new trajectory changes it
    again = build_sft_data([r1, r2], tmp_path / "again.parquet", top_n=1, prompt=lambda q: f"few-shot + {q}")
    assert again["digest"] == info["digest"]
    plain = build_sft_data([r1, r2], tmp_path / "plain.parquet", top_n=1)  # stored prompts kept
    assert plain["digest"] != info["digest"]
    assert pq.read_table(tmp_path / "plain.parquet").column("prompt").to_pylist() == ["P[a]", "P[b]"]
    assert not list(out.parent.glob(".*tmp*"))


def test_build_sft_data_with_no_rows_writes_an_empty_table(tmp_path):
    info = build_sft_data([tmp_path / "none.parquet"], tmp_path / "out.parquet", top_n=2)
    assert info["rows"] == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 0
