"""The run lease (one driver per run directory) and temp-file collection that respects writers on other hosts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.lease import LEASE_NAME, Holder, LeaseHeld, RunLease
from pipeline.storage import RunDir, TreeStore, host_identity, pid_alive

REPO = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("problem_id", pa.string()), ("node", pa.int32())])
OTHER_HOST = "0badc0de"  # a host identity that is not ours (ours is a hash of hostname, boot id, pid namespace)


def forge(root: Path, *, host_id: str, pid: int, heartbeat_age_s: float, host: str = "gpu-node-7") -> Holder:
    """Write the lease another driver would have written."""
    now = time.time()
    h = Holder(host=host, host_id=host_id, pid=pid, pid_start=None, since="2026-12-01T01:02:03+00:00",
               since_ts=now - 3600, heartbeat_ts=now - heartbeat_age_s, token="f" * 32)
    root.mkdir(parents=True, exist_ok=True)
    (root / LEASE_NAME).write_text(json.dumps(asdict(h)))
    return h


@pytest.fixture
def sleeper():
    """A live process on this host that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(proc.stdout)
    assert not pid_alive(pid)
    return pid


def test_acquire_release_and_a_second_driver_is_refused_naming_the_holder(tmp_path):
    first = RunLease(tmp_path)
    me = first.acquire()
    held = json.loads((tmp_path / LEASE_NAME).read_text())
    assert (held["host"], held["pid"], held["host_id"]) == (socket.gethostname(), os.getpid(), host_identity())
    with pytest.raises(LeaseHeld) as e:
        RunLease(tmp_path).acquire(force=True)  # force never takes a live lease
    msg = str(e.value)
    assert f"host {socket.gethostname()} pid {os.getpid()} since {me.since}" in msg, msg
    assert "--force" in msg and "stale" in msg, msg
    first.release()
    assert not (tmp_path / LEASE_NAME).exists()
    second = RunLease(tmp_path)
    second.acquire()
    second.release()
    first.release()  # twice is fine, and does not remove someone else's lease


def test_heartbeat_renews_and_a_lease_taken_from_us_is_noticed(tmp_path):
    clock = [1000.0]
    lease = RunLease(tmp_path, timeout_s=40, clock=lambda: clock[0])
    lease.acquire()
    clock[0] += 30
    assert lease.renew() and lease.holder().heartbeat_ts == 1030.0
    forge(tmp_path, host_id=OTHER_HOST, pid=1, heartbeat_age_s=0)  # someone forced a takeover
    assert not lease.renew() and lease.lost.host == "gpu-node-7" and not lease.held
    lease.release()
    assert (tmp_path / LEASE_NAME).exists()  # theirs, not removed by us


def test_the_heartbeat_thread_keeps_a_short_lease_fresh(tmp_path):
    lease = RunLease(tmp_path, timeout_s=0.4)  # renewed every 0.1 s
    lease.acquire()
    time.sleep(0.6)
    other = RunLease(tmp_path, timeout_s=0.4)
    with pytest.raises(LeaseHeld, match="being driven by"):  # older than the timeout, yet not stale
        other.acquire(force=True)
    lease.release()


def test_live_holder_on_this_host_is_never_taken_over(tmp_path, sleeper):
    forge(tmp_path, host_id=host_identity(), pid=sleeper.pid, heartbeat_age_s=5, host="here")
    with pytest.raises(LeaseHeld, match=f"host here pid {sleeper.pid} since 2026-12-01T01:02:03"):
        RunLease(tmp_path).acquire(force=True)


def test_dead_holder_on_this_host_is_taken_over_without_force(tmp_path, dead_pid):
    # A SIGKILLed driver on this machine: provably gone, so resume just continues.
    forge(tmp_path, host_id=host_identity(), pid=dead_pid, heartbeat_age_s=1)
    lease = RunLease(tmp_path)
    lease.acquire()
    old, why = lease.taken_over
    assert old.pid == dead_pid and why == f"its process {dead_pid} on this host is gone"
    lease.release()


def test_other_hosts_holder_needs_a_stale_heartbeat_and_force(tmp_path):
    forge(tmp_path, host_id=OTHER_HOST, pid=4242, heartbeat_age_s=30)  # fresh: alive as far as we can tell
    with pytest.raises(LeaseHeld, match="being driven by host gpu-node-7 pid 4242 .*last heartbeat 30 s ago"):
        RunLease(tmp_path, timeout_s=120).acquire(force=True)
    forge(tmp_path, host_id=OTHER_HOST, pid=4242, heartbeat_age_s=600)  # stale past the 120 s timeout
    with pytest.raises(LeaseHeld, match=r"gpu-node-7 pid 4242 .*looks gone \(no heartbeat for 600 s .*--force"):
        RunLease(tmp_path, timeout_s=120).acquire()
    lease = RunLease(tmp_path, timeout_s=120)
    lease.acquire(force=True)
    assert lease.taken_over[0].host == "gpu-node-7" and lease.holder().token == lease.mine.token
    lease.release()


# ---------------------------------------------------------------------------------- round.py and resume


def _finished_run(tmp_path: Path) -> tuple[Path, str]:
    """A run directory whose round 1 is complete: a driver that gets the lease prints 'nothing to do' and exits."""
    from pipeline.config import dump_config, load_config

    config = REPO / "configs" / "tiny.yaml"
    run = RunDir(tmp_path / "run")
    run.write_config(dump_config(load_config(config)))
    run.mark_round_success(1)
    run.report_path.write_text("| round | ... |\n")
    return run.root, str(config)


@pytest.mark.parametrize("entry", ["round.py", "pipeline.resume"])
def test_cli_refuses_a_second_driver_and_takes_a_stale_lease_over_with_force(tmp_path, capsys, sleeper, entry):
    import round as round_py
    from pipeline import resume

    root, config = _finished_run(tmp_path)

    def drive(*extra: str) -> int:
        if entry == "round.py":
            return round_py.main(["--config", config, "--run-dir", str(root), "--rounds", "1", *extra])
        return resume.main([str(root), "--rounds", "1", *extra])

    forge(root, host_id=host_identity(), pid=sleeper.pid, heartbeat_age_s=1, host="head-0")
    assert drive("--force") == 2
    err = capsys.readouterr().err
    assert f"this run is being driven by host head-0 pid {sleeper.pid} since 2026-12-01T01:02:03" in err, err
    forge(root, host_id=OTHER_HOST, pid=77, heartbeat_age_s=3600)
    assert drive() == 2
    assert "gpu-node-7 pid 77" in capsys.readouterr().err
    assert drive("--force") == 0
    assert "already complete; nothing to do" in capsys.readouterr().out
    assert not (root / LEASE_NAME).exists()  # released on exit
    events = [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]
    taken = [e for e in events if e["event"] == "lease_taken_over"]
    assert len(taken) == 1 and (taken[0]["holder_host"], taken[0]["holder_pid"]) == ("gpu-node-7", 77), taken


def test_an_unreachable_object_store_is_an_error_naming_it_not_a_local_directory(tmp_path, capsys, monkeypatch):
    import round as round_py

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the store refuses every connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_REGION": "us-east-1", "OPEN_RSTAR_STAGING": str(tmp_path / "staging")}.items():
        monkeypatch.setenv(k, v)
    status = round_py.main(["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", "s3://bucket/run"])
    err = capsys.readouterr().err
    assert status == 2 and "s3://bucket/run: reading _lease.json failed" in err and "credentials" in err, err
    assert os.listdir(tmp_path) == ["staging"] and os.listdir(tmp_path / "staging") == [], os.listdir(tmp_path)


# ---------------------------------------------------------------------------------- temp-file collection


def _tmp(store: TreeStore, host_id: str, pid: int, age_s: float) -> Path:
    path = store.dir / f".tmp-{host_id}-{pid}-{uuid.uuid4().hex[:12]}.parquet"
    path.write_bytes(b"partial shard")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_collect_garbage_keeps_other_hosts_files_unless_we_hold_the_lease_and_they_predate_it(tmp_path, dead_pid):
    run = RunDir(tmp_path)
    store = TreeStore(run.trees_dir(1), SCHEMA, "problem_id")
    store.dir.mkdir(parents=True)
    # Another host's writer whose pid happens to be dead *here*: the pid says nothing about that host.
    old_remote = _tmp(store, OTHER_HOST, dead_pid, age_s=600)
    legacy = store.dir / f".tmp-{dead_pid}-0123abcd.parquet"  # named before host identities: host unknown
    legacy.write_bytes(b"x")
    os.utime(legacy, (time.time() - 600, time.time() - 600))
    local_dead = _tmp(store, host_identity(), dead_pid, age_s=600)
    local_live = _tmp(store, host_identity(), os.getpid(), age_s=600)
    assert store.collect_garbage() == [local_dead]  # no lease: only this host's dead writer is judged

    run.acquire_lease()
    new_remote = _tmp(store, OTHER_HOST, dead_pid, age_s=-5)  # written after we took the lease: one of ours
    try:
        removed = run.trees(1, SCHEMA, "problem_id").collect_garbage()
    finally:
        run.lease.release()
    assert sorted(removed) == sorted([old_remote, legacy])
    assert local_live.exists() and new_remote.exists()


def test_without_the_lease_held_a_stale_other_host_file_is_kept(tmp_path, dead_pid):
    store = TreeStore(tmp_path, SCHEMA, "problem_id", lease=RunLease(tmp_path))  # constructed, never acquired
    remote = _tmp(store, OTHER_HOST, dead_pid, age_s=10_000)
    assert store.collect_garbage() == [] and remote.exists()


def test_a_driver_whose_lease_was_taken_over_stops_before_its_next_phase(tmp_path):
    from pipeline.driver import RoundContext, run_round
    from pipeline.runlog import RunLog

    run = RunDir(tmp_path)
    lease = run.acquire_lease()
    try:
        forge(tmp_path, host_id=OTHER_HOST, pid=9, heartbeat_age_s=0)  # someone else --forced the run meanwhile
        assert not lease.renew()
        ctx = RoundContext(cfg=None, run=run, round_no=1, log=RunLog(run.log_path), problems=[], eval_problems=[])
        with pytest.raises(LeaseHeld, match="taken over by host gpu-node-7 pid 9 .*stopping before the next phase"):
            run_round(ctx)
        assert run.phases_done(1) == []  # no phase ran
    finally:
        lease.release()
    assert (tmp_path / LEASE_NAME).exists()  # the new holder's lease is left alone
