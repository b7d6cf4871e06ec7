"""Damaged tree shards: detected by the manifest's checksums, reported by file name, repaired by redoing them."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from pipeline.storage import CORRUPT_DIR, RunDir, StorageError, TreeStore

SCHEMA = pa.schema([("problem_id", pa.string()), ("node", pa.int32()), ("text", pa.string()), ("verdict", pa.string())])


def tree(pid: str, n: int) -> list[dict]:
    return [{"problem_id": pid, "node": i, "text": f"{pid}/{i}" * 20, "verdict": ""} for i in range(n)]


def filled(trees_dir, problems=("a", "b", "c", "d", "e")) -> TreeStore:
    """Shards of 2 problems: [a b] [c d] [e]; problem i has i+2 rows."""
    store = TreeStore(trees_dir, SCHEMA, "problem_id")
    store.write_plan(list(problems))
    with store.writer(shard_problems=2) as w:
        for i, pid in enumerate(problems):
            w.append(pid, tree(pid, i + 2), solved=False)
    return store


def rows_by_problem(store: TreeStore) -> dict[str, list[str]]:
    return {t.column("problem_id")[0].as_py(): t.column("text").to_pylist() for t in store.iter_trees()}


def test_manifest_records_each_shards_size_and_sha256(tmp_path):
    store = filled(tmp_path)
    for s in store.shards():
        data = (tmp_path / s.file).read_bytes()
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest()), s.file
    assert store.verify() == []


def test_truncated_shard_is_a_storage_error_naming_the_file_not_an_arrow_error(tmp_path):
    store = filled(tmp_path)
    bad = tmp_path / store.shards()[1].file
    size = bad.stat().st_size
    os.truncate(bad, size // 2)
    with pytest.raises(StorageError) as e:
        rows_by_problem(store)
    msg = str(e.value)
    assert str(bad) in msg and "truncated" in msg and f"{size // 2} bytes but {size}" in msg, msg
    assert "pipeline.resume" in msg and "2 problems" in msg, msg  # what to do, and what it costs
    assert [(s.file, why.split(" ")[1]) for s, why in store.verify()] == [(bad.name, "bytes")]


def test_same_size_content_change_is_caught_by_the_checksum(tmp_path):
    store = filled(tmp_path)
    bad = tmp_path / store.shards()[0].file
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte, same size
    bad.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"part-00000\.parquet: damaged: sha256 .*\(the content changed\)"):
        rows_by_problem(store)


def test_damaged_shard_without_a_checksum_is_still_a_storage_error(tmp_path):
    # A manifest written before checksums existed: only the parquet footer and row count can be checked.
    store = filled(tmp_path)
    manifest = json.loads(store.manifest_path.read_text())
    for s in manifest["shards"]:
        del s["size"], s["sha256"]
    store.manifest_path.write_text(json.dumps(manifest))
    assert store.verify() == []
    bad = tmp_path / "part-00002.parquet"
    bad.write_bytes(bad.read_bytes()[:-20])  # footer gone
    with pytest.raises(StorageError, match=r"part-00002\.parquet: damaged: not a readable parquet file"):
        rows_by_problem(store)


def test_repair_moves_bad_shards_aside_and_their_problems_are_redone(tmp_path):
    store = filled(tmp_path)
    want = rows_by_problem(store)
    os.truncate(tmp_path / "part-00001.parquet", 100)  # holds c, d
    (tmp_path / "part-00002.parquet").unlink()  # holds e: a listed shard that is missing is repaired the same way
    dropped = store.repair()
    assert sorted((s.file, why.split(" ")[0]) for s, why in dropped) == [("part-00001.parquet", "100"),
                                                                         ("part-00002.parquet", "missing")]
    assert store.pending_problem_ids() == ["c", "d", "e"]
    assert [s.file for s in store.shards()] == ["part-00000.parquet"]
    aside = os.listdir(tmp_path / CORRUPT_DIR)
    assert len(aside) == 1 and aside[0].endswith("-part-00001.parquet"), aside  # kept, not deleted
    assert store.repair() == []  # idempotent
    with store.writer(shard_problems=2) as w:  # the rollouts phase redoes exactly the pending problems
        for pid in store.pending_problem_ids():
            w.append(pid, tree(pid, "abcde".index(pid) + 2), solved=False)
    assert store.pending_problem_ids() == [] and store.verify() == []
    assert rows_by_problem(store) == want  # by content, not only by count


def test_driver_repairs_damaged_rounds_and_reopens_their_rollouts_and_export(tmp_path):
    from pipeline.driver import repair_trees
    from pipeline.runlog import RunLog

    run = RunDir(tmp_path / "run")
    for r in (1, 2):
        filled(run.trees_dir(r))
        for phase in ("rollouts", "export", "train_policy", "train_ppm", "eval"):
            run.mark_done(r, phase)
        run.mark_round_success(r)
    os.truncate(run.trees_dir(2) / "part-00000.parquet", 10)
    log = RunLog(run.log_path)
    assert repair_trees(run, [1, 2], log) == {2: ["a", "b"]}
    assert run.round_succeeded(1) and run.phases_done(1) == ["rollouts", "export", "train_ppm", "train_policy", "eval"]
    # Round 2 redoes its rollouts (the pending problems) and re-exports; the models trained before the damage stay.
    assert not run.round_succeeded(2) and run.phases_done(2) == ["train_ppm", "train_policy", "eval"]
    assert run.trees(2).pending_problem_ids() == ["a", "b"]
    events = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    damaged = [e for e in events if e.get("event") == "shard_damaged"]
    assert len(damaged) == 1 and damaged[0]["file"].endswith("round_2/trees/part-00000.parquet"), damaged


def test_export_cli_reports_a_damaged_shard_by_name_with_exit_status_2(tmp_path, capsys):
    from pathlib import Path

    from pipeline.cli import main
    from pipeline.config import dump_config, load_config

    run = RunDir(tmp_path / "run")
    run.write_config(dump_config(load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")))
    filled(run.trees_dir(1))
    os.truncate(run.trees_dir(1) / "part-00000.parquet", 10)
    assert main(["export", str(run.root), "--round", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {run.trees_dir(1) / 'part-00000.parquet'}: damaged: 10 bytes but" in err, err
    assert f"python -m pipeline.resume {run.root}" in err, err
