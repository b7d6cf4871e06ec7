"""End-to-end runs of the whole pipeline as a user starts it: ``round.py`` and ``python -m pipeline...`` in
subprocesses (issues 7 and 8).

1. ``test_sigkill_mid_rollouts_then_resume_equals_uninterrupted``: a round-1 run is SIGKILLed (its whole
   process group, which takes the local Ray cluster it started with it) after some but not all of its trees are
   committed; ``python -m pipeline.resume`` finishes it, and its node tables equal those of a run that was never
   interrupted, row for row: nothing lost, nothing stored twice, the committed trees not redone.
2. ``TestTinyPreset``: ``configs/tiny.yaml``, all four rounds, once (a module-scoped fixture); then every phase
   ran, every export loads with ``datasets`` and has its schema's columns, the report covers rounds 0-4,
   ``python -m pipeline info`` shows every round, trained checkpoints reload, resuming a finished run changes
   nothing and a changed config is refused.

What the tiny models find is not asserted (the bootstrap prompt and model are tuned elsewhere); what the phase
markers record is: a round whose export wrote SFT rows must have trained a policy, and so on.

Every run gets its own process session (``start_new_session``): on a timeout or a failed assertion the test
kills exactly that group and the processes it saw the run start, never anything else on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = "configs/tiny.yaml"

pytestmark = pytest.mark.slow  # each test runs the real pipeline for a minute or more on 2 cores

# Round 1 only, rollouts only, on the tiny random model (fast, deterministic), one problem per shard so a kill
# can fall between commits. ``rollouts.groups`` = one tree per worker thread: the engine serves the threads'
# requests one at a time, so the six trees finish one after another (about one generation apart) instead of
# all in the same wave, which leaves a window to kill the run with some but not all trees committed.
KILL_PROBLEMS = 6
KILL_OVERRIDES = [
    "engines.bootstrap_model=tiny-random",
    "storage.shard_problems=1",
    f"problems.n={KILL_PROBLEMS}",
    "eval.enabled=false",
    "rounds.schedule.0.train_policy=false",
    "rounds.schedule.0.train_ppm=false",
    f"rollouts.groups={KILL_PROBLEMS}",
    "engines.generation.max_new_tokens_solution=48",
    # Bit-identical text needs every forward to have the same shape in both runs: one request decoding at a time
    # and no prefix KV from earlier prompts (README, "Reproducibility"). With the defaults a row's logits move in
    # the last bits with whatever shares its batch, and the random tiny model's near-flat sampling follows them.
    "engines.max_batch_rows=1",
    "engines.prefix_cache_mb=0",
]
RUN_TIMEOUT_S = 900  # per subprocess of the kill test (each takes about 30 s); generous for a loaded machine
# The whole tiny preset must fit CI's 40 minutes with the rest of the suite; a run this slow fails the test.
TINY_TIMEOUT_S = 1500


def _env() -> dict[str, str]:
    # A run must start its own local Ray cluster, not join one a developer's shell points at.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([PYTHON, *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


def _descendants(pid: int) -> dict[int, float]:
    """pid -> create time of every live descendant of ``pid`` (create time tells a reused pid apart)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for c in children:
        try:
            out[c.pid] = c.create_time()
        except psutil.NoSuchProcess:
            continue
    return out


def _alive(procs: dict[int, float]) -> dict[int, str]:
    """The processes of ``procs`` still running (zombies count as gone): pid -> command line."""
    import psutil

    out = {}
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
                continue
            out[pid] = " ".join(p.cmdline())[:160]
        except psutil.NoSuchProcess:
            continue
    return out


def _kill(proc: subprocess.Popen, seen: dict[int, float]) -> None:
    """SIGKILL the run's process group and any process it started that left the group (by pid, checked)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in _alive(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _wait_gone(procs: dict[int, float], timeout: float = 20.0) -> dict[int, str]:
    """Wait up to ``timeout`` s for ``procs`` to exit; the ones still alive then (pid -> command line)."""
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _run(args: list[str], log: Path, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Run a CLI to completion in its own session; (exit status, its output). A hang is killed, with its tree,
    and so is anything the run started that outlived it (which fails the test: a run must clean up after itself,
    Ray cluster and sandbox workers included)."""
    proc = _start(args, log)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{' '.join(args)} still running after {timeout:.0f}s; output:\n{_tail(log)}")
            seen.update(_descendants(proc.pid))
            time.sleep(0.2)
        left = _wait_gone(seen)
        assert not left, f"{' '.join(args)} exited {proc.returncode} but left processes running: {left}"
    finally:
        _kill(proc, seen)
    return proc.returncode, log.read_text(errors="replace")


def _node_table(run_dir: Path, round_no: int = 1):
    """Every committed node row of a round, sorted by (problem id, node id), read via the manifest."""
    import pyarrow as pa

    from pipeline.storage import RunDir

    trees = list(RunDir(run_dir).trees(round_no).iter_trees())
    table = pa.concat_tables(trees) if trees else None
    assert table is not None, f"{run_dir}: no committed trees in round {round_no}"
    return table.sort_by([("problem_id", "ascending"), ("id", "ascending")])


# ------------------------------------------------------------------------------------------- 1. kill + resume


def _kill_mid_rollouts(args: list[str], committed: Callable[[], set[str]], log: Path) -> None:
    """Start ``round.py args`` and SIGKILL its process group once ``committed()`` names some but not all
    problems; nothing the run started may outlive it."""
    proc = _start(args, log)
    seen: dict[int, float] = {}
    done: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_descendants(proc.pid))
            done = committed()
            if 1 <= len(done) < KILL_PROBLEMS:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
        assert done and len(done) < KILL_PROBLEMS, (
            f"run was not killed mid-rollouts (rc={proc.returncode}, {len(done)}/{KILL_PROBLEMS} trees "
            f"committed when last looked); slow it down with more problems or rollouts. Output:\n{_tail(log)}")
        # The group kill took the driver's local Ray cluster with it; the sandbox workers (their own sessions)
        # and Ray's workers notice their parent is gone and exit. Nothing of the run may outlive it.
        survivors = _wait_gone(seen)
        assert not survivors, f"processes of the killed run still alive 20s after SIGKILL: {survivors}"
    finally:
        _kill(proc, seen)


def _export_rows(run_dir: Path, round_no: int = 1) -> dict[str, list[str]]:
    """Every export table of a round as its rows, each row one JSON text, sorted: content, not order or count."""
    import json

    import pyarrow.parquet as pq

    from pipeline.storage import EXPORT_TABLES, RunDir

    run = RunDir(run_dir)
    return {t: sorted(json.dumps(r, sort_keys=True, default=str)
                      for r in pq.read_table(run.export_path(round_no, t)).to_pylist()) for t in EXPORT_TABLES}


def _assert_resumed_equals_uninterrupted(resumed: Path, clean: Path, before: list) -> None:
    """The resumed run kept the shards committed before the kill, redid the rest, and its node tables and
    exports equal the uninterrupted run's row for row."""
    from pipeline.storage import RunDir

    run = RunDir(resumed)
    after = run.trees(1).shards()
    done_before = {p for s in before for p in s.problems}
    # The trees committed before the kill were kept as they were, not redone; the rest were added.
    assert after[: len(before)] == before, f"committed shards changed on resume: {before} -> {after[:len(before)]}"
    stats = run.marker(1, "rollouts")["info"]["stats"]
    assert (stats["skipped"], stats["done"]) == (len(done_before), KILL_PROBLEMS - len(done_before)), stats
    # Each problem in exactly one shard; no leftovers of the killed writer (collect_garbage removed them).
    listed = [p for s in after for p in s.problems]
    assert sorted(listed) == sorted(set(listed)) and set(listed) == set(run.trees(1).plan()), listed
    assert len(listed) == KILL_PROBLEMS
    stray = sorted(p.name for p in run.trees_dir(1).iterdir()
                   if p.name.startswith(".tmp-") or (p.suffix == ".parquet" and p.name not in {s.file for s in after}))
    assert not stray, f"uncommitted files left in {run.trees_dir(1)}: {stray}"

    a, b = _node_table(resumed), _node_table(clean)
    assert a.column_names == b.column_names
    keys = list(zip(a.column("problem_id").to_pylist(), a.column("id").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)), "a node is stored twice in the resumed run"
    assert sorted(set(a.column("problem_id").to_pylist())) == sorted(set(b.column("problem_id").to_pylist()))
    assert a.num_rows == b.num_rows, f"resumed run has {a.num_rows} node rows, uninterrupted {b.num_rows}"
    for name in a.column_names:
        va, vb = a.column(name).to_pylist(), b.column(name).to_pylist()
        diff = [i for i, (x, y) in enumerate(zip(va, vb, strict=True)) if x != y]
        assert not diff, (f"column {name!r} differs at {len(diff)} rows, first {keys[diff[0]]}: "
                          f"{va[diff[0]]!r} vs {vb[diff[0]]!r}")
    # The exports read the same trees, so they must agree too: by content (sorted rows), not only by count.
    rows_a, rows_b = _export_rows(resumed), _export_rows(clean)
    for table in rows_a:
        only_a = sorted(set(rows_a[table]) - set(rows_b[table]))
        only_b = sorted(set(rows_b[table]) - set(rows_a[table]))
        assert rows_a[table] == rows_b[table], (f"export {table}: {len(rows_a[table])} rows resumed vs "
                                                f"{len(rows_b[table])} uninterrupted; only resumed: {only_a[:1]}; "
                                                f"only uninterrupted: {only_b[:1]}")
    assert len(rows_a["trees"]) == a.num_rows, (len(rows_a["trees"]), a.num_rows)


def test_sigkill_mid_rollouts_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    from pipeline.storage import RunDir

    killed, clean = tmp_path / "A", tmp_path / "B"
    args = ["round.py", "--config", TINY, "--rounds", "1", *_sets(KILL_OVERRIDES)]

    # -- run A, killed with some but not all trees committed
    trees = RunDir(killed).trees(1)
    _kill_mid_rollouts([*args, "--run-dir", str(killed)],
                       lambda: trees.completed_problem_ids() if trees.manifest_path.exists() else set(),
                       tmp_path / "A.log")
    before = trees.shards()  # what the crash left committed (a commit may have landed just before the kill)
    done_before = {p for s in before for p in s.problems}
    assert 1 <= len(done_before) < KILL_PROBLEMS, f"after the kill: {sorted(done_before)} committed"
    assert not RunDir(killed).is_done(1, "rollouts"), "the rollouts phase was marked done by a killed run"

    # -- resume A; run B uninterrupted with the same config
    rc, out = _run(["-m", "pipeline.resume", str(killed), "--rounds", "1"], tmp_path / "A-resume.log")
    assert rc == 0, f"pipeline.resume exited {rc}:\n{out[-4000:]}"
    rc, out = _run([*args, "--run-dir", str(clean)], tmp_path / "B.log")
    assert rc == 0, f"uninterrupted run exited {rc}:\n{out[-4000:]}"
    _assert_resumed_equals_uninterrupted(killed, clean, before)


def test_sigkill_mid_rollouts_on_s3_then_resume_equals_uninterrupted(tmp_path: Path, s3_bucket: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on object storage: ``--run-dir s3://BUCKET/run`` on a real S3-protocol server (moto), the
    standard AWS_* variables inherited by the subprocesses; the resumed run is downloaded and compared with an
    uninterrupted local run."""
    import json

    from pipeline.storage import RunDir, ShardInfo
    from pipeline.storage.remote import ObjectStore

    uri, clean = f"{s3_bucket}/run", tmp_path / "B"
    monkeypatch.setenv("OPEN_RSTAR_STAGING", str(tmp_path / "staging"))  # the killed driver's copy stays in here
    args = ["round.py", "--config", TINY, "--rounds", "1", *_sets(KILL_OVERRIDES)]
    store = ObjectStore(uri)

    def shards() -> list[ShardInfo]:
        data = store.read_bytes("round_1/trees/_manifest.json")
        return [ShardInfo.from_json(s) for s in json.loads(data)["shards"]] if data else []

    _kill_mid_rollouts([*args, "--run-dir", uri], lambda: {p for s in shards() for p in s.problems},
                       tmp_path / "A.log")
    before = shards()
    assert 1 <= sum(len(s.problems) for s in before) < KILL_PROBLEMS, before
    assert store.read_bytes("round_1/_done/rollouts.json") is None, "rollouts marked done by a killed run"
    assert store.read_bytes("_lease.json") is not None, "a SIGKILLed driver cannot have released its lease"

    rc, out = _run(["-m", "pipeline.resume", uri, "--rounds", "1"], tmp_path / "A-resume.log")
    assert rc == 0, f"pipeline.resume {uri} exited {rc}:\n{out[-4000:]}"
    assert store.read_bytes("_lease.json") is None, "the resumed driver did not release its lease"
    left = sorted(p.name for p in (tmp_path / "staging").iterdir())
    assert not left, f"staging copies left behind (the killed driver's is removed by the next one): {left}"
    rc, out = _run([*args, "--run-dir", str(clean)], tmp_path / "B.log")
    assert rc == 0, f"uninterrupted run exited {rc}:\n{out[-4000:]}"

    resumed = RunDir.open(uri)
    resumed.pull()  # what the store holds, in a fresh local copy
    try:
        _assert_resumed_equals_uninterrupted(resumed.root, clean, before)
    finally:
        resumed.close()


# ------------------------------------------------------------------------------------------- 2. the tiny preset


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime in ns, size) of every file under ``run_dir``."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``round.py --config configs/tiny.yaml``, all four rounds, once for the whole class below."""
    base = tmp_path_factory.mktemp("tiny")
    run_dir = base / "run"
    t0 = time.perf_counter()
    rc, out = _run(["round.py", "--config", TINY, "--run-dir", str(run_dir)], base / "run.log", TINY_TIMEOUT_S)
    assert rc == 0, f"round.py --config {TINY} exited {rc} after {time.perf_counter() - t0:.0f}s:\n{out[-6000:]}"
    return run_dir


def _from_round_dir(path: str | None) -> str | None:
    """'/runs/x/round_1/policy' -> 'round_1/policy'; a model name or None as it is."""
    return path if path is None or "/round_" not in path else "round_" + path.rsplit("/round_", 1)[1]


class TestTinyPreset:
    def _cfg(self, run_dir: Path):
        from pipeline.config import load_config

        return load_config(run_dir / "config.yaml")

    def test_every_round_ran_every_phase(self, tiny_run: Path) -> None:
        from pipeline.storage import PHASES, RunDir

        run, cfg = RunDir(tiny_run), self._cfg(tiny_run)
        round0 = [0] if cfg.eval.enabled and cfg.eval.base_model else []
        assert cfg.rounds.count == 4 and run.rounds() == [*round0, 1, 2, 3, 4], run.rounds()
        for r in range(1, 5):
            assert run.phases_done(r) == list(PHASES), f"round {r}: phases done {run.phases_done(r)}"
            assert run.round_succeeded(r), f"round {r}: no _SUCCESS"
            plan = run.trees(r).plan()
            stored = run.trees(r).completed_problem_ids()
            assert plan and stored == set(plan), f"round {r}: {len(stored)} trees stored of {plan}"
            assert run.marker(r, "rollouts")["info"]["stored"] == len(plan)
        if cfg.eval.enabled:
            for r in [*round0, 1, 2, 3, 4]:
                assert (tiny_run / f"round_{r}" / "eval.json").is_file(), f"round {r}: no eval.json"

    def test_markers_agree_with_the_data(self, tiny_run: Path) -> None:
        """What a phase did follows from what the phase before it produced, as the markers record it."""
        from pipeline.storage import RunDir
        from rounds.ppm_model import is_ppm_checkpoint

        run, cfg = RunDir(tiny_run), self._cfg(tiny_run)
        bootstrap = cfg.engines.bootstrap_model or cfg.engines.policy_model
        for r in range(1, 5):
            spec = cfg.rounds.schedule[r - 1]
            roll = run.marker(r, "rollouts")["info"]
            rows = run.marker(r, "export")["info"]["rows"]
            assert rows["trees"] == sum(s.rows for s in run.trees(r).shards()), (r, rows)
            if roll["solved"] and cfg.search.extract.sft_top_n:
                assert rows["sft"] > 0, f"round {r}: {roll['solved']} solved trees but no SFT rows"
            pol = run.marker(r, "train_policy")["info"]
            if spec.train_policy and rows["sft"] > 0:
                assert "skipped" not in pol and (run.policy_dir(r) / "config.json").is_file(), (r, pol)
            else:
                assert "skipped" in pol and not run.policy_dir(r).exists(), (r, pol)
            ppm = run.marker(r, "train_ppm")["info"]
            if spec.train_ppm and rows["ppm_pairs"] >= 2:
                assert "skipped" not in ppm and is_ppm_checkpoint(run.ppm_dir(r)), (r, ppm)
            else:
                assert "skipped" in ppm and not run.ppm_dir(r).exists(), (r, ppm)
            # Lineage: the newest policy / PPM trained before this round searched it (DESIGN.md, the four rounds).
            # Markers hold the checkpoint paths the run used; compare them from round_N/ on.
            trained = [e for e in range(1, r) if (run.policy_dir(e) / "config.json").is_file()]
            earlier_policies = [f"round_{e}/policy" for e in trained]
            earlier_ppms = [f"round_{e}/ppm" for e in range(1, r) if (run.ppm_dir(e) / "config.json").is_file()]
            want_policy = bootstrap if spec.policy == "bootstrap" else ([bootstrap] + earlier_policies)[-1]
            want_ppm = ([None] + earlier_ppms)[-1] if spec.q_mode == "ppm" else None
            got = (_from_round_dir(roll["policy"]), _from_round_dir(roll["ppm"]))
            assert got == (want_policy, want_ppm), (r, roll["policy"], roll["ppm"])

    def test_every_export_loads_with_its_schema(self, tiny_run: Path, tmp_path: Path) -> None:
        import datasets
        import pyarrow.parquet as pq

        from data.schemas import SCHEMAS
        from pipeline.storage import EXPORT_TABLES, RunDir

        run = RunDir(tiny_run)
        for r in range(1, 5):
            rows = run.marker(r, "export")["info"]["rows"]
            for table in EXPORT_TABLES:
                path = run.export_path(r, table)
                schema = pq.read_schema(path)
                assert schema.names == SCHEMAS[table].names, (path, schema.names)
                assert pq.read_metadata(path).num_rows == rows[table], (path, rows)
                if rows[table] == 0:
                    # datasets 5.2 cannot load a parquet file without rows ("Instruction 'train' corresponds to
                    # no data"), whatever its row groups; the training phases skip empty files for that reason.
                    assert schema.equals(SCHEMAS[table], check_metadata=False), path
                    continue
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train",
                                           cache_dir=str(tmp_path / f"hf-{r}-{table}"))
                assert ds.column_names == SCHEMAS[table].names, (path, ds.column_names)
                assert ds.num_rows == rows[table], (path, ds.num_rows, rows)
                if table == "steps":
                    labels = [x for row in ds["labels"] for x in row]
                    assert all(-1.0 <= x <= 1.0 for x in labels), (path, min(labels), max(labels))

    def test_report_plot_and_info_cover_every_round(self, tiny_run: Path) -> None:
        import re

        report = (tiny_run / "report.md").read_text()
        main_table = report.split("\n## ")[0]  # later sections (cognitive behaviours) have tables of their own
        table_rounds = [int(m.group(1)) for m in re.finditer(r"^\|\s*(\d+)\b", main_table, re.MULTILINE)]
        assert table_rounds == [0, 1, 2, 3, 4], report  # row 0 reads '| 0 (base) |'
        assert (tiny_run / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        rc, out = _run(["-m", "pipeline", "info", str(tiny_run)], tiny_run.parent / "info.log", timeout=120)
        assert rc == 0, out
        assert "(4/4 rounds done)" in out, out
        for r in range(1, 5):
            assert f"round {r}: done" in out, f"round {r} missing from `pipeline info`:\n{out}"
        assert "report: report.md=yes, rounds.png=yes" in out, out

    def test_trained_checkpoints_reload(self, tiny_run: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.storage import RunDir
        from rounds.ppm_model import load_ppm, ppm_scores

        run = RunDir(tiny_run)
        policies = [run.policy_dir(r) for r in range(1, 5) if (run.policy_dir(r) / "config.json").is_file()]
        ppms = [run.ppm_dir(r) for r in range(1, 5) if (run.ppm_dir(r) / "config.json").is_file()]
        if not policies and not ppms:
            pytest.skip("the tiny run trained no checkpoint (no round found a correct solution): nothing to reload")
        for path in policies:
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            ids = tok("# Step 1: add the numbers", return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                logits = model(input_ids=ids).logits
            assert logits.shape == (1, ids.shape[1], model.config.vocab_size), (path, logits.shape)
            assert torch.isfinite(logits).all(), path
        for path in ppms:
            model, tok = load_ppm(path)
            scores = ppm_scores(model, tok, ["What is 2 + 3?\n# add them\nprint(2 + 3)", "5"])
            assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores), (path, scores)

    def test_resuming_a_finished_run_changes_nothing(self, tiny_run: Path) -> None:
        log = tiny_run / "log.jsonl"
        before, log_before = _files(tiny_run), log.read_text()
        rc, out = _run(["-m", "pipeline.resume", str(tiny_run)], tiny_run.parent / "resume.log", timeout=120)
        assert rc == 0, out
        assert "already complete; nothing to do" in out, out
        after = _files(tiny_run)
        # The log records the attempt (appended; nothing before it rewritten); every other file is untouched.
        assert log.read_text().startswith(log_before)
        before.pop("log.jsonl"), after.pop("log.jsonl")
        assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                                 if before.get(k) != after.get(k)}

    def test_resuming_with_a_changed_config_is_refused(self, tiny_run: Path) -> None:
        before = _files(tiny_run)
        rc, out = _run(["-m", "pipeline.resume", str(tiny_run), "--set", "seed=1"], tiny_run.parent / "refused.log",
                       timeout=120)
        assert rc == 2, f"exit status {rc}, expected 2:\n{out}"
        assert "seed: 0 -> 1" in out and "--force" in out, out
        assert _files(tiny_run) == before, "a refused resume wrote to the run directory"
