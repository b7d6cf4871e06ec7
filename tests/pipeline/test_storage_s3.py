"""Run directories on object storage, against a real S3-protocol server (moto in server mode, tests/conftest.py).

Commit and read back through a local staging copy, the manifest's checksums against the stored objects, resume
in a fresh process state, a damaged object repaired by redoing its problems, the run lease as an object, and the
CLI entry points (resume's config, info, export) taking ``s3://`` URIs.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from pipeline.lease import LEASE_NAME, LeaseHeld
from pipeline.storage import CORRUPT_DIR, RunDir, StorageError, atomic_dir, opened_run, stored_config
from pipeline.storage.remote import ObjectStore

SCHEMA = pa.schema([("problem_id", pa.string()), ("node", pa.int32()), ("text", pa.string()), ("verdict", pa.string())])
PROBLEMS = ("a", "b", "c", "d", "e")


def tree(pid: str, n: int) -> list[dict]:
    return [{"problem_id": pid, "node": i, "text": f"{pid}/{i}", "verdict": ""} for i in range(n)]


def driven(uri: str, problems=PROBLEMS, shard_problems: int = 2) -> RunDir:
    """Open ``uri`` as a driver does (lease, download) and commit ``problems`` (problem i has i+2 rows)."""
    run = RunDir.open(uri)
    run.acquire_lease()
    store = run.trees(1, SCHEMA, "problem_id")
    if store.plan() is None:
        store.write_plan(list(PROBLEMS))
    with store.writer(shard_problems=shard_problems) as w:
        for pid in problems:
            w.append(pid, tree(pid, PROBLEMS.index(pid) + 2), solved=pid == "c")
    return run


def rows(run: RunDir) -> dict[str, list[str]]:
    return {t.column("problem_id")[0].as_py(): t.column("text").to_pylist()
            for t in run.trees(1, SCHEMA, "problem_id").iter_trees()}


def manifest(store: ObjectStore) -> dict:
    return json.loads(store.read_bytes("round_1/trees/_manifest.json"))


def test_commits_are_objects_with_the_manifests_checksums_and_read_back_in_a_fresh_copy(s3_bucket):
    uri = f"{s3_bucket}/runs/x"
    run = driven(uri)
    staging = run.root
    run.close()
    assert not staging.exists(), "the staging copy outlived the driver"
    store = ObjectStore(uri)
    objects = store.list()
    assert LEASE_NAME not in objects, "the lease was not released on the store"
    shards = manifest(store)["shards"]
    # 5 problems in shards of 2: [a b] [c d] [e]
    assert [s["problems"] for s in shards] == [["a", "b"], ["c", "d"], ["e"]]
    for s in shards:
        data = store.read_bytes(f"round_1/trees/{s['file']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["size"], s["sha256"]), s["file"]
    assert shards[1]["solved"] == ["c"]

    again = RunDir.open(uri)
    again.acquire_lease()
    try:
        assert again.root != staging
        assert again.trees(1).completed_problem_ids() == set(PROBLEMS)
        assert again.trees(1).pending_problem_ids() == []
        assert rows(again) == {p: [f"{p}/{i}" for i in range(PROBLEMS.index(p) + 2)] for p in PROBLEMS}
    finally:
        again.close()


def test_a_killed_driver_loses_only_uncommitted_problems_and_resume_finishes_them(s3_bucket):
    uri = f"{s3_bucket}/run"
    run = driven(uri, problems=("a", "b"))  # [a b] committed
    writer = run.trees(1, SCHEMA, "problem_id").writer(shard_problems=2)
    writer.append("c", tree("c", 4), solved=True)  # buffered, then the driver "dies" (no close, no release):
    run.remote.close()  # its staging copy goes with it, the buffered tree never committed; the lease stays
    run.lease._stop.set()  # (the heartbeat of a dead process stops too)
    lease = json.loads(ObjectStore(uri).read_bytes(LEASE_NAME))
    assert lease["pid"] == os.getpid()
    # A second driver on this host: the holder (this very pid) is alive, so it is refused, naming it.
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        RunDir.open(uri).acquire_lease()
    ObjectStore(uri).write_bytes(LEASE_NAME, json.dumps({**lease, "pid": 2**22 + 7, "pid_start": None}).encode())
    resumed = driven(uri, problems=PROBLEMS)  # the holder's pid is dead on this host: taken over without --force
    try:
        assert resumed.lease.taken_over is not None and "is gone" in resumed.lease.taken_over[1]
        # c was never committed (it was in the dead driver's buffer); c d and e are added now, a b kept.
        assert [s.problems for s in resumed.trees(1).shards()] == [("a", "b"), ("c", "d"), ("e",)]
    finally:
        resumed.close()
    assert [s["problems"] for s in manifest(ObjectStore(uri))["shards"]] == [["a", "b"], ["c", "d"], ["e"]]


def test_a_killed_drivers_staging_directory_is_removed_by_the_next_one_on_this_host(s3_bucket, tmp_path,
                                                                                    monkeypatch):
    from pipeline.storage import host_identity

    monkeypatch.setenv("OPEN_RSTAR_STAGING", str(tmp_path))
    dead = tmp_path / f"open-rstar-run-{host_identity()}-{2**22 + 7}-abc"  # pid above pid_max: not running
    alive = tmp_path / f"open-rstar-run-{host_identity()}-{os.getpid()}-abc"
    other_host = tmp_path / f"open-rstar-run-00000000-{2**22 + 7}-abc"
    for d in (dead, alive, other_host):
        (d / "round_1").mkdir(parents=True)
    run = RunDir.open(f"{s3_bucket}/run")
    try:
        assert not dead.exists() and alive.exists() and other_host.exists()
        assert run.root.parent == tmp_path and run.root.name.startswith(f"open-rstar-run-{host_identity()}-")
    finally:
        run.close()


def test_a_damaged_object_is_named_moved_aside_and_its_problems_redone(s3_bucket):
    uri = f"{s3_bucket}/run"
    driven(uri).close()
    store = ObjectStore(uri)
    bad = manifest(store)["shards"][1]
    data = bytearray(store.read_bytes(f"round_1/trees/{bad['file']}"))
    data[len(data) // 2] ^= 0xFF  # bit rot in the stored object, same size
    store.write_bytes(f"round_1/trees/{bad['file']}", bytes(data))

    run = RunDir.open(uri)
    run.acquire_lease()
    try:
        trees = run.trees(1, SCHEMA, "problem_id")
        repaired = trees.repair()
        assert [(s.file, why.split(" ")[0]) for s, why in repaired] == [(bad["file"], "sha256")]
        assert trees.pending_problem_ids() == ["c", "d"]
        # The store's manifest no longer lists the damaged shard; the damaged copy was kept as evidence.
        assert [s["problems"] for s in manifest(store)["shards"]] == [["a", "b"], ["e"]]
        assert any(k.startswith(f"round_1/trees/{CORRUPT_DIR}/") for k in store.list())
        with trees.writer(shard_problems=2) as w:
            for pid in trees.pending_problem_ids():
                w.append(pid, tree(pid, PROBLEMS.index(pid) + 2), solved=False)
    finally:
        run.close()
    check = RunDir.open(uri)
    check.pull()
    try:
        assert check.trees(1).verify() == []
        assert rows(check) == {p: [f"{p}/{i}" for i in range(PROBLEMS.index(p) + 2)] for p in PROBLEMS}
    finally:
        check.close()


def test_markers_checkpoints_and_cleared_markers_reach_the_store(s3_bucket):
    uri = f"{s3_bucket}/run"
    store = ObjectStore(uri)
    with opened_run(uri) as run:
        run.write_config("seed: 1\n")
        with atomic_dir(run.policy_dir(1)) as tmp:  # a checkpoint: staged locally, uploaded as a directory
            (tmp / "config.json").write_text("{}")
            (tmp / "old-shard.bin").write_bytes(b"x" * 10)
        # Written by another process on this node (a Ray task): no publisher saw it; the marker's sync uploads it.
        (run.round_dir(1) / "eval.json").write_text('{"by": "a ray task"}')
        run.mark_done(1, "rollouts", {"n": 3})
        run.mark_round_success(1)
        assert {"config.yaml", "round_1/policy/config.json", "round_1/_done/rollouts.json",
                "round_1/_SUCCESS", "round_1/eval.json"} <= set(store.list())
        with atomic_dir(run.policy_dir(1)) as tmp:  # replaced: the old version's extra file goes too
            (tmp / "config.json").write_text('{"v": 2}')
        with pytest.raises(StorageError, match="did not go through RunDir.ship / RunDir.fetch"):
            # a checkpoint that never reached our staging copy: no marker may say it is done
            run.mark_done(1, "train_ppm", {"out_dir": str(run.ppm_dir(1))})
        assert "round_1/_done/train_ppm.json" not in store.list()
        run.clear_done(1, "rollouts")
        run.clear_round_success(1)
    keys = set(store.list())
    assert "round_1/policy/old-shard.bin" not in keys and store.read_bytes("round_1/policy/config.json") == b'{"v": 2}'
    assert "round_1/_done/rollouts.json" not in keys and "round_1/_SUCCESS" not in keys, keys
    with stored_config(uri) as path:
        assert path.read_text() == "seed: 1\n"
    with stored_config(f"{s3_bucket}/nothing-here") as path:
        assert not path.exists()


def test_a_file_rewritten_with_the_same_size_goes_up_before_the_next_marker(s3_bucket):
    uri = f"{s3_bucket}/run"
    store = ObjectStore(uri)
    with opened_run(uri) as run:
        stats = run.round_dir(1) / "stats.json"  # written by another process on this node: no publisher sees it
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text('{"solved": 3}')
        run.mark_done(1, "rollouts")
        assert store.read_bytes("round_1/stats.json") == b'{"solved": 3}'
        stats.write_text('{"solved": 4}')  # same size, other content
        run.mark_done(1, "export")
        assert store.read_bytes("round_1/stats.json") == b'{"solved": 4}', "a same-size rewrite never reached the store"
        # Nothing changed since: the next sync uploads nothing (a checkpoint is not sent again before every marker).
        assert run.remote.sync_up("round_1") == []
    with opened_run(uri) as again:  # a resumed driver: what it downloaded counts as on the store
        assert again.remote.sync_up("") == []
        (again.round_dir(1) / "stats.json").write_text('{"solved": 5}')
        assert again.remote.sync_up("round_1") == ["round_1/stats.json"]


def test_a_fresh_run_under_an_object_store_runs_dir_gets_a_free_name(s3_bucket):
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    first = RunDir.fresh(f"{s3_bucket}/runs/", "demo", now)
    try:
        assert first.location == f"{s3_bucket}/runs/demo-20260102-030405"
        first.acquire_lease()
        first.write_config("seed: 0\n")
    finally:
        first.close()
    second = RunDir.fresh(f"{s3_bucket}/runs", "demo", now)  # the same second: the next free name
    try:
        assert second.location == f"{s3_bucket}/runs/demo-20260102-030405-2", second.location
    finally:
        second.close()


def test_export_is_refused_while_a_driver_holds_the_run_and_info_names_it(s3_bucket, capsys):
    from pipeline.cli import main

    uri = f"{s3_bucket}/run"
    run = driven(uri)  # holds the lease
    try:
        run.write_config("seed: 0\n")
        assert main(["export", uri, "--round", "1"]) == 2
        err = capsys.readouterr().err
        assert uri in err and f"pid {os.getpid()}" in err, err
        assert main(["info", uri]) == 0
        page = capsys.readouterr().out
        assert page.splitlines()[0].startswith(f"run {uri} ") and "lease: held by host" in page, page
        assert "problems: 5/5 done, 1 solved" in page, page
    finally:
        run.close()
    assert main(["info", uri]) == 0
    assert "lease: free" in capsys.readouterr().out


def test_the_log_goes_up_with_commits_at_most_every_log_every_s_whole_lines_only(s3_bucket, monkeypatch):
    from pipeline.storage import remote

    uri = f"{s3_bucket}/run"
    store = ObjectStore(uri)
    run = RunDir.open(uri)
    run.acquire_lease()
    try:
        with open(run.log_path, "a") as f:
            f.write('{"n": 1}\n')
        driven_commit = run.trees(1, SCHEMA, "problem_id")
        driven_commit.write_plan(list(PROBLEMS))
        with driven_commit.writer(shard_problems=1) as w:
            w.append("a", tree("a", 2), solved=False)
        assert store.read_bytes("log.jsonl") is None, "the log went up sooner than LOG_EVERY_S after the last time"
        monkeypatch.setattr(remote, "LOG_EVERY_S", 0.0)
        with open(run.log_path, "a") as f:
            f.write('{"n": 2}\n{"n": 3, "cut sh')  # a line being appended while the commit uploads the log
        with driven_commit.writer(shard_problems=1) as w:
            w.append("b", tree("b", 2), solved=False)
        assert store.read_bytes("log.jsonl") == b'{"n": 1}\n{"n": 2}\n', store.read_bytes("log.jsonl")
        with open(run.log_path, "a") as f:
            f.write('ort"}\n')
    finally:
        run.close()
    assert store.read_bytes("log.jsonl") == b'{"n": 1}\n{"n": 2}\n{"n": 3, "cut short"}\n'


def test_the_log_goes_up_at_each_heartbeat_while_nothing_is_committed(s3_bucket):
    import time

    uri = f"{s3_bucket}/run"
    store = ObjectStore(uri)
    run = RunDir.open(uri)
    run.acquire_lease(timeout_s=0.4)  # a heartbeat every 0.1 s (+ the object lease's 1 s settle)
    try:
        with open(run.log_path, "a") as f:
            f.write('{"event": "training"}\n')  # and then a long phase that commits nothing
        deadline = time.monotonic() + 15
        while store.read_bytes("log.jsonl") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.read_bytes("log.jsonl") == b'{"event": "training"}\n', "no heartbeat uploaded the log in 15 s"
    finally:
        run.close()
