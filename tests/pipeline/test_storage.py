"""Run directory storage: atomic writes, the shard commit protocol, crash safety, markers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import (
    PHASES,
    RunDir,
    StorageError,
    TreeStore,
    TreeWriter,
    atomic_dir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    host_identity,
    read_json,
)

# A stand-in node table: the storage layer only needs the problem-id column; the real schema is data.schemas.
SCHEMA = pa.schema([("problem_id", pa.string()), ("node", pa.int32()), ("text", pa.string()), ("verdict", pa.string())])
REPO = Path(__file__).resolve().parents[2]


def tree(pid: str, n: int, correct: bool = False) -> list[dict]:
    """n rows; with ``correct`` the last one is a correct terminal."""
    return [
        {"problem_id": pid, "node": i, "text": f"{pid}/{i}", "verdict": "correct" if correct and i == n - 1 else ""}
        for i in range(n)
    ]


def store_at(path: Path) -> TreeStore:
    return TreeStore(path, SCHEMA, "problem_id")


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert files(p.parent) == ["a.txt"]
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert read_json(tmp_path / "b.json") == {"x": [1, 2]}


def test_atomic_path_failure_keeps_old_file(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert files(tmp_path) == ["a.txt"]


def test_atomic_path_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(StorageError, match="produced no file"):
        with atomic_path(tmp_path / "x.bin"):
            pass


def test_read_json_names_a_damaged_file(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(StorageError, match="m.json: not valid JSON"):
        read_json(tmp_path / "m.json")


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "policy"
    with atomic_dir(target) as d:
        (d / "config.json").write_text("v1")
    with atomic_dir(target) as d:
        (d / "config.json").write_text("v2")
        (d / "model.safetensors").write_text("w")
    assert files(target) == ["config.json", "model.safetensors"]
    assert (target / "config.json").read_text() == "v2"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "config.json").write_text("v3")
            raise RuntimeError("training died")
    assert (target / "config.json").read_text() == "v2"
    assert files(tmp_path) == ["policy"]  # no temp or .old directories left


def test_atomic_dir_keep_existing_keeps_what_another_writer_installed_first(tmp_path, monkeypatch):
    # A cache entry built by two writers at once (rounds.models._cached): the one that installs second keeps the
    # first one's entry, also when that appeared between its check and its rename (the rename then fails).
    target = tmp_path / "entry"
    rename = os.rename

    def rival_wins(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "theirs").write_text("1")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", rival_wins)
    with atomic_dir(target, keep_existing=True) as d:
        (d / "ours").write_text("2")
    assert files(target) == ["theirs"] and files(tmp_path) == ["entry"]
    monkeypatch.setattr(os, "rename", rename)
    with atomic_dir(target, keep_existing=True) as d:  # already there: ours is dropped, nothing renamed
        (d / "ours").write_text("2")
    assert files(target) == ["theirs"] and files(tmp_path) == ["entry"]


# ---------------------------------------------------------------------------------------------- shards


def test_writer_commits_shards_of_n_problems_and_manifest_lists_them(tmp_path):
    store = store_at(tmp_path / "trees")
    with store.writer(shard_problems=2) as w:
        for i in range(5):
            assert w.append(f"p{i}", tree(f"p{i}", i + 1), solved=(i % 2 == 0))
    shards = store.shards()
    # 5 problems in shards of 2 -> [p0 p1] [p2 p3] [p4] (the last flushed by close)
    assert [s.problems for s in shards] == [("p0", "p1"), ("p2", "p3"), ("p4",)]
    assert [s.file for s in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # rows = tree sizes: 1+2, 3+4, 5
    assert [s.rows for s in shards] == [3, 7, 5]
    assert [s.solved for s in shards] == [("p0",), ("p2",), ("p4",)]
    assert store.completed_problem_ids() == {"p0", "p1", "p2", "p3", "p4"}
    assert store.solved_problem_ids() == {"p0", "p2", "p4"}
    assert pq.read_table(store.dir / "part-00001.parquet").column("text").to_pylist()[:2] == ["p2/0", "p2/1"]
    assert not [n for n in files(store.dir) if n.startswith(".tmp-")]


def test_solved_is_derived_from_verdicts_when_not_given(tmp_path):
    store = store_at(tmp_path)
    with store.writer(10) as w:
        w.append("s", tree("s", 3, correct=True))
        w.append("u", tree("u", 3))
        w.append("t", tree("t", 3, correct=True), solved=False)  # the caller's word wins
    assert store.solved_problem_ids() == {"s"}
    no_verdict = TreeStore(tmp_path / "x", pa.schema([("problem_id", pa.string())]))
    with pytest.raises(StorageError, match="pass solved=True/False"):
        no_verdict.writer().append("a", [{"problem_id": "a"}])


def test_append_is_idempotent_by_problem_id(tmp_path):
    store = store_at(tmp_path)
    with store.writer(shard_problems=10) as w:
        assert w.append("a", tree("a", 2))
        assert not w.append("a", tree("a", 3))  # already buffered
        assert w.buffered == ["a"]
    with store.writer() as w2:
        assert not w2.append("a", tree("a", 2))  # already committed
        assert w2.append("b", tree("b", 1))
        assert w2.skipped == ["a"]
    assert [s.problems for s in store.shards()] == [("a",), ("b",)]
    assert sum(s.rows for s in store.shards()) == 3  # a: 2 rows + b: 1 row, the duplicate never written


def test_slow_problems_are_committed_after_max_age(tmp_path):
    now = [100.0]
    store = store_at(tmp_path)
    w = TreeWriter(store, shard_problems=8, max_age_s=30, clock=lambda: now[0])
    w.append("a", tree("a", 1))
    now[0] = 120.0
    w.append("b", tree("b", 1))  # the buffer's oldest tree (a) waited 20 s < 30 s: keep buffering
    assert w.flush_if_stale() is None and store.shards() == []
    now[0] = 130.0  # a has waited 30 s
    info = w.flush_if_stale()
    assert info is not None and info.problems == ("a", "b")
    now[0] = 200.0
    w.append("c", tree("c", 1))  # a fresh buffer: its age counts from c's arrival
    assert w.buffered == ["c"]
    with pytest.raises(ValueError, match="max_age_s=-1: must be >= 0"):
        TreeWriter(store, max_age_s=-1)


def test_two_writers_racing_on_one_problem_store_it_once(tmp_path):
    store = store_at(tmp_path)
    w1, w2 = store.writer(10), store.writer(10)
    w1.append("x", tree("x", 2))
    w2.append("x", tree("x", 2))
    w2.append("y", tree("y", 3))
    w1.flush()
    info = w2.flush()  # x was committed by w1 meanwhile: w2's shard is rewritten without it
    assert info is not None and info.problems == ("y",) and info.rows == 3
    assert pq.read_table(store.dir / info.file).column("problem_id").to_pylist() == ["y"] * 3
    assert sorted(p for s in store.shards() for p in s.problems) == ["x", "y"]


def test_rows_must_fit_schema_and_carry_the_problem_id(tmp_path):
    w = store_at(tmp_path).writer()
    with pytest.raises(StorageError, match="column 'problem_id' holds"):
        w.append("a", tree("b", 2))
    with pytest.raises(StorageError, match="no rows"):
        w.append("a", [])
    with pytest.raises(StorageError, match="do not fit the trees schema"):
        w.append("a", [{"problem_id": "a", "node": "not an int", "text": "t", "verdict": ""}])
    # An Arrow table with extra columns in another order is selected and cast to the schema.
    t = pa.table({"extra": [1], "verdict": [""], "text": ["t"], "node": pa.array([0], pa.int64()), "problem_id": ["a"]})
    assert w.append("a", t)
    assert w._buffer[0][1].schema == SCHEMA


def test_exception_inside_writer_commits_nothing(tmp_path):
    store = store_at(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer(10) as w:
            w.append("a", tree("a", 1))
            raise RuntimeError("worker died")
    assert store.shards() == [] and store.completed_problem_ids() == set()


def test_iter_trees_streams_one_problem_at_a_time_across_batches(tmp_path):
    store = store_at(tmp_path)
    with store.writer(shard_problems=2) as w:
        for pid, n in [("a", 3), ("b", 1), ("c", 4)]:
            w.append(pid, tree(pid, n))
    # batch_size=2 splits trees across record batches: a=[0,1][2], b shares a batch with a's last row, ...
    got = [(t.column("problem_id")[0].as_py(), t.num_rows) for t in store.iter_trees(batch_size=2)]
    assert got == [("a", 3), ("b", 1), ("c", 4)]
    only = next(iter(store.iter_trees(columns=["text"])))
    assert only.column_names == ["problem_id", "text"]
    assert only.column("text").to_pylist() == ["a/0", "a/1", "a/2"]


def test_listed_shard_that_is_missing_is_reported(tmp_path):
    store = store_at(tmp_path)
    with store.writer() as w:
        w.append("a", tree("a", 1))
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(StorageError, match=r"part-00000.parquet: damaged: missing. It is listed in .* pipeline.resume"):
        list(store.iter_trees())


def test_unknown_manifest_format_is_refused(tmp_path):
    atomic_write_json(tmp_path / "_manifest.json", {"format": 99, "shards": []})
    with pytest.raises(StorageError, match="unknown manifest format 99"):
        store_at(tmp_path).shards()


def test_orphan_shard_is_ignored_and_collected_and_its_name_not_reused(tmp_path):
    store = store_at(tmp_path)
    with store.writer() as w:
        w.append("a", tree("a", 1))
    # A crash after the rename but before the manifest: a shard nobody lists, plus a dead writer's temp file.
    pq.write_table(pa.Table.from_pylist(tree("b", 2), schema=SCHEMA), tmp_path / "part-00001.parquet")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = f".tmp-{host_identity()}-{dead.stdout.strip()}-0123456789ab.parquet"  # a dead writer on this host
    (tmp_path / dead_tmp).write_bytes(b"half")
    live = tmp_path / f".tmp-{host_identity()}-{os.getpid()}-0123456789ab.parquet"  # a live writer's (ours): kept
    live.write_bytes(b"in flight")
    assert store.completed_problem_ids() == {"a"}
    assert [t.num_rows for t in store.iter_trees()] == [1]
    with store.writer() as w:  # 'b' is redone; its shard must not overwrite anything listed
        assert w.append("b", tree("b", 2))
    assert [s.file for s in store.shards()] == ["part-00000.parquet", "part-00002.parquet"]
    removed = store.collect_garbage()
    assert [p.name for p in removed] == [dead_tmp, "part-00001.parquet"]
    assert live.exists()
    assert sorted(t.column("problem_id")[0].as_py() for t in store.iter_trees()) == ["a", "b"]


_KILLED_WRITER = textwrap.dedent("""
    import sys, pyarrow as pa
    from pipeline.storage import TreeStore
    schema = pa.schema([("problem_id", pa.string()), ("node", pa.int32()), ("text", pa.string())])
    store = TreeStore(sys.argv[1], schema, "problem_id")
    store.collect_garbage()
    w = store.writer(shard_problems=1)
    for i in range(int(sys.argv[2])):
        pid = f"p{i:03d}"
        w.append(pid, [{"problem_id": pid, "node": j, "text": "x" * 200} for j in range(50)], solved=False)
        print(pid, flush=True)
""")


def test_sigkill_mid_writing_loses_only_in_flight_problems_and_never_duplicates(tmp_path):
    # Kill a writer process at three different moments; each restart resumes from the manifest.
    n = 60
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    trees = tmp_path / "trees"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for after_lines in (3, 11, 23):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(trees), str(n)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(after_lines):
            proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        done = store_at(trees).completed_problem_ids()
        assert len(done) >= after_lines, (after_lines, len(done))  # each printed id was committed first
    subprocess.run([sys.executable, str(script), str(trees), str(n)], check=True, env=env, capture_output=True)
    store = store_at(trees)
    ids = [p for s in store.shards() for p in s.problems]
    assert sorted(ids) == [f"p{i:03d}" for i in range(n)]  # nothing lost, nothing twice
    per_tree = [t.num_rows for t in store.iter_trees()]
    assert per_tree == [50] * n
    assert not [f for f in files(trees) if f.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------- run directory


def test_fresh_run_dirs_are_unique(tmp_path):
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    a = RunDir.fresh(tmp_path, "demo", now)
    b = RunDir.fresh(tmp_path, "demo", now)
    assert a.root.name == "demo-20260102-030405"
    assert b.root.name == "demo-20260102-030405-2"


def test_layout_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.trees_dir(2) == tmp_path / "r" / "round_2" / "trees"
    assert run.export_path(1, "ppm_pairs") == tmp_path / "r" / "round_1" / "ppm_pairs.parquet"
    assert run.marker_path(3, "eval") == tmp_path / "r" / "round_3" / "_done" / "eval.json"
    with pytest.raises(ValueError, match="table='pairs': must be one of sft, ppm_pairs, steps, trees"):
        run.export_path(1, "pairs")
    with pytest.raises(ValueError, match="round=0: rounds are numbered from 1"):
        run.round_dir(0)
    assert not (tmp_path / "r").exists()  # paths touch nothing


def test_config_is_written_atomically_and_required(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(StorageError, match="config.yaml: not found"):
        run.read_config()
    run.write_config("name: r\nseed: 1\n")
    assert run.read_config() == "name: r\nseed: 1\n"


def test_phase_markers(tmp_path):
    run = RunDir(tmp_path)
    assert run.phases_done(1) == []
    run.mark_done(1, "train_ppm", {"loss": 0.25})
    run.mark_done(1, "rollouts")
    assert run.phases_done(1) == ["rollouts", "train_ppm"]  # pipeline order, not marking order
    assert run.marker(1, "train_ppm")["info"] == {"loss": 0.25}
    assert not run.is_done(2, "rollouts")
    run.clear_done(1, "rollouts")
    run.clear_done(1, "eval")  # absent: fine
    assert run.phases_done(1) == ["train_ppm"]
    with pytest.raises(ValueError, match="phase='extract': must be one of " + ", ".join(PHASES)):
        run.mark_done(1, "extract")
    assert not run.round_succeeded(1)
    run.mark_round_success(1)
    assert run.round_succeeded(1) and run.rounds() == [1]
    run.write_eval(1, {"pass@1": 0.5})
    assert run.read_eval(1) == {"pass@1": 0.5} and run.read_eval(2) is None


def test_plan_and_pending(tmp_path):
    run = RunDir(tmp_path)
    store = run.trees(1, SCHEMA, "problem_id")
    assert store.plan() is None
    with pytest.raises(StorageError, match="no plan"):
        store.pending_problem_ids()
    with pytest.raises(StorageError, match=r"duplicate problem ids \['a'\]"):
        store.write_plan(["a", "b", "a"])
    store.write_plan(["a", "b", "c"])
    with store.writer() as w:
        w.append("b", tree("b", 1))
    assert store.pending_problem_ids() == ["a", "c"]
    assert run.completed_problem_ids(1) == {"b"}
    assert json.loads((store.dir / "_plan.json").read_text())["problems"] == ["a", "b", "c"]


def test_storage_import_stays_light():
    # `python -m pipeline info --help` imports pipeline.storage; it must not drag in pyarrow or torch.
    code = "import sys, pipeline.storage, pipeline.info, pipeline.runlog; print('pyarrow' in sys.modules, 'torch' in sys.modules)"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"], (out.stdout, time.monotonic() - t0)
