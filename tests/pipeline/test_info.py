"""The run log (pipeline.runlog) and the one-page run summary (pipeline.info)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.info import info
from pipeline.runlog import Progress, RunLog, RunLogConfig, format_event, read_log
from pipeline.storage import RunDir, StorageError


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------- runlog


def test_log_writes_json_lines_and_a_console_line(tmp_path):
    out = io.StringIO()
    clock = FakeClock(0.0)
    with RunLog(tmp_path / "log.jsonl", stream=out, clock=clock) as log:
        log.info("round.start", round=1, problems=40)
        clock.t = 1.5
        log.debug("quiet", x=1)  # file only: console_level is info
        log.error("engine.died", actor="engine-0", path=tmp_path, ids={"b", "a"})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    recs = [json.loads(s) for s in lines]
    assert [r["event"] for r in recs] == ["round.start", "quiet", "engine.died"]
    assert recs[0] == {
        "ts": "1970-01-01T00:00:00.000+00:00",
        "level": "info",
        "event": "round.start",
        "round": 1,
        "problems": 40,
    }
    assert recs[1]["ts"] == "1970-01-01T00:00:01.500+00:00"
    assert recs[2]["path"] == str(tmp_path) and recs[2]["ids"] == ["a", "b"]  # non-JSON fields made JSON
    console = out.getvalue().splitlines()
    assert len(console) == 2
    assert console[0].endswith("info    round.start round=1 problems=40")
    assert "error   engine.died actor=engine-0" in console[1]


def test_log_rejects_reserved_fields_and_bad_levels(tmp_path):
    log = RunLog(None, RunLogConfig(console=False))
    with pytest.raises(ValueError, match=r"\['event'\]: reserved"):
        log.info("x", event="y")
    with pytest.raises(ValueError, match="level='fatal'"):
        log.log("fatal", "x")
    with pytest.raises(ValueError, match="console_level='loud'"):
        RunLogConfig(console_level="loud")
    with pytest.raises(ValueError, match="progress_interval_s=0: must be > 0"):
        RunLogConfig(progress_interval_s=0)


def test_read_log_tail_filters_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with RunLog(path, RunLogConfig(console=False)) as log:
        for i in range(2000):
            log.log("warning" if i % 500 == 0 else "info", "tick", i=i)
    with open(path, "a") as f:
        f.write('{"ts": "2026-01-01T00:00:00", "level": "info", "ev')  # a writer killed mid-line
    assert [r["i"] for r in read_log(path, last=3)] == [1997, 1998, 1999]
    assert [r["i"] for r in read_log(path, last=2, min_level="warning")] == [1000, 1500]
    assert len(read_log(path)) == 2000
    assert read_log(tmp_path / "missing.jsonl") == []


def test_lines_backwards_across_block_boundaries(tmp_path):
    from pipeline.runlog import _lines_backwards

    path = tmp_path / "f"
    path.write_bytes(b"alpha\nbe\n\ngamma-long-line\nd")  # blank lines are skipped, the last may lack \n
    for block in (1, 3, 7, 1 << 16):
        assert list(_lines_backwards(path, block)) == [b"d", b"gamma-long-line", b"be", b"alpha"], block


def test_format_event():
    rec = {"ts": "2026-11-23T10:50:01.123+00:00", "level": "info", "event": "x.done", "rate": 0.123456, "n": 3}
    assert format_event(rec) == "10:50:01 info    x.done rate=0.1235 n=3"


def test_progress_logs_periodically_without_a_terminal(tmp_path):
    clock = FakeClock(0.0)
    log = RunLog(tmp_path / "log.jsonl", RunLogConfig(console=False, progress_interval_s=10))
    p = Progress(log, "rollouts", total=4, context={"round": 2}, clock=clock, use_tqdm=False)
    clock.t = 5.0
    p.update(problems=1, solved=1, rollouts=8, tokens=800)  # 5 s < 10 s: nothing logged yet
    assert read_log(log.path) == []
    clock.t = 10.0
    p.update(problems=1, rollouts=8, tokens=1200)
    rec = read_log(log.path)[-1]
    # 2 problems, 1 solved -> 0.5; 16 rollouts / 10 s = 1.6/s; 2000 tokens / 10 s = 200/s
    assert rec["event"] == "rollouts.progress" and rec["round"] == 2
    assert (rec["problems"], rec["total"], rec["solve_rate"]) == (2, 4, 0.5)
    assert (rec["rollouts_per_s"], rec["tokens_per_s"]) == (1.6, 200.0)
    clock.t = 20.0
    final = p.close()
    p.close()  # once only
    done = [r for r in read_log(log.path) if r["event"] == "rollouts.done"]
    assert len(done) == 1 and final["rollouts_per_s"] == 0.8  # 16 rollouts / 20 s
    log.close()


def test_progress_shows_no_token_rate_until_something_counts_tokens(tmp_path):
    clock = FakeClock(0.0)
    log = RunLog(tmp_path / "log.jsonl", RunLogConfig(console=False, progress_interval_s=1))
    p = Progress(log, "rollouts", total=2, context={}, clock=clock, use_tqdm=False)
    clock.t = 2.0
    p.update(problems=1, rollouts=4)
    assert "tokens" not in read_log(log.path)[-1] and "tokens_per_s" not in p.snapshot()
    clock.t = 4.0
    p.set_tokens(1000)  # e.g. the engines' total at the end of the phase
    final = p.close()
    assert (final["tokens"], final["tokens_per_s"]) == (1000, 250.0)
    log.close()


def test_progress_draws_tqdm_on_a_terminal(tmp_path):
    out = io.StringIO()
    log = RunLog(tmp_path / "log.jsonl", RunLogConfig(progress_interval_s=0.001), stream=out)
    with Progress(log, "rollouts", total=3, context={}, use_tqdm=True) as p:
        p.update(problems=2, solved=1, rollouts=4, tokens=10)
    assert "rollouts" in out.getvalue() and "2/3" in out.getvalue()
    assert [r["event"] for r in read_log(log.path)] == ["rollouts.done"]  # the bar replaces periodic lines


# ---------------------------------------------------------------------------------------------- info

SCHEMA = pa.schema([("problem_id", pa.string()), ("node", pa.int32())])
CONFIG = {
    "name": "demo",
    "seed": 7,
    "problems": {"source": "builtin:arith", "n": 4},
    "engines": {"backend": "transformers", "policy_model": "tiny-random"},
    "rounds": {"from_base": True, "schedule": [
        {"policy": "bootstrap", "q_mode": "terminal", "gen_mode": "solution", "rollouts": 8, "children": 5,
         "unsolved_rollouts": []},
        {"policy": "previous", "q_mode": "terminal", "gen_mode": "step", "rollouts": 16, "children": 8,
         "unsolved_rollouts": [64, 128]},
    ]},
}


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "demo")
    run.write_config(yaml.safe_dump(CONFIG, sort_keys=False))
    store = run.trees(1, SCHEMA, "problem_id")
    store.write_plan(["a", "b", "c", "d"])
    with store.writer(shard_problems=2) as w:
        w.append("a", [{"problem_id": "a", "node": i} for i in range(3)], solved=True)
        w.append("b", [{"problem_id": "b", "node": 0}], solved=False)
        w.append("c", [{"problem_id": "c", "node": i} for i in range(2)], solved=True)
    (store.dir / "part-00009.parquet").write_bytes(b"orphan")
    pq.write_table(pa.table({"prompt": ["p"] * 5, "completion": ["c"] * 5}), run.export_path(1, "sft"))
    run.mark_done(1, "rollouts")
    run.mark_done(1, "export")
    (run.policy_dir(1)).mkdir()
    (run.policy_dir(1) / "config.json").write_text("{}")
    (run.ppm_dir(1)).mkdir()  # a checkpoint directory without config.json: incomplete
    run.write_eval(1, {"greedy": {"pass@1": 0.25}, "maj@8": 0.5, "n": 40, "model": "x"})
    with RunLog(run.log_path, RunLogConfig(console=False)) as log:
        log.info("round.start", round=1)
        log.error("engine.died", actor="engine-0", reason="OOM")
        log.info("rollouts.done", round=1, problems=3)
    return run


def test_info_summarises_a_partial_run(tmp_path):
    run = make_run(tmp_path)
    text = info(run.root)
    print(text)
    lines = text.splitlines()
    assert lines[0] == f"run {run.root}  (0/2 rounds done)"
    assert lines[1] == "lease: free (no driver holds this run)"
    assert "name: demo   seed: 7" in lines
    assert "  problems: source=builtin:arith, n=4" in lines
    assert "round 1: in progress" in lines
    assert "  spec: policy=bootstrap q=terminal gen=solution rollouts=8 children=5" in lines
    assert "  phases: rollouts=done export=done train_ppm=- train_policy=- eval=-" in lines
    # a: 3 nodes solved, b: 1 node, c: 2 nodes solved -> 3/4 done, 2 solved = 66.7%, 2 shards, 6 nodes
    assert "  problems: 3/4 done, 2 solved (solve rate 66.7%), 2 shards, 6 nodes" in lines
    assert any("1 uncommitted file(s)" in ln for ln in lines)
    assert "  exports: sft=5 rows" in lines
    assert "  checkpoints: policy=yes ppm=incomplete" in lines
    assert "  eval: greedy.pass@1=0.25, maj@8=0.5, n=40" in lines
    assert "round 2: not started" in lines
    assert "  spec: policy=previous q=terminal gen=step rollouts=16 (unsolved: 64, 128) children=8" in lines
    assert "report: report.md=no, rounds.png=no" in lines
    err = lines.index("last warnings/errors:")
    assert "engine.died actor=engine-0 reason=OOM" in lines[err + 1]
    assert lines[-1].endswith("rollouts.done round=1 problems=3")


def test_info_names_the_driver_holding_the_run(tmp_path):
    import os
    import socket

    run = make_run(tmp_path)
    lease = run.acquire_lease()
    try:
        line = info(run.root).splitlines()[1]
        assert line.startswith(f"lease: held by host {socket.gethostname()} pid {os.getpid()} since "), line
        assert "stale" not in line, line
    finally:
        lease.release()
    assert info(run.root).splitlines()[1] == "lease: free (no driver holds this run)"


def test_info_on_a_finished_round_and_damaged_parts(tmp_path):
    run = make_run(tmp_path)
    run.mark_round_success(1)
    run.export_path(1, "steps").write_bytes(b"not parquet")
    (run.trees_dir(1) / "_manifest.json").write_text("{broken")
    text = info(run.root)
    assert f"run {run.root}  (1/2 rounds done)" in text
    assert "round 1: done" in text
    assert "error (problems): " in text and "_manifest.json: not valid JSON" in text
    assert "steps=unreadable" in text


def test_info_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(StorageError, match="config.yaml: not found"):
        info(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(StorageError, match="expected a mapping"):
        info(tmp_path)
