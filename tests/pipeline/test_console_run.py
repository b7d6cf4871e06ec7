"""The console of a real run (issue 18): round 1 of the tiny preset through round.py, once on a pipe (plain lines,
as CI and `ray job logs` see it) and once on a pseudo-terminal (tqdm bars, as `make run` shows it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs Ray, the tiny random model and the sandbox: a minute or so on 2 cores

ROOT = Path(__file__).resolve().parents[2]
# Round 1 on the tiny random model (fast), rollouts and export; no training or evaluation to wait for.
ARGS = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--rounds", "1",
        "--set", "engines.bootstrap_model=tiny-random", "--set", "eval.enabled=false",
        "--set", "rounds.schedule.0.train_policy=false", "--set", "rounds.schedule.0.train_ppm=false"]
# What the console must not show: library warnings, HF load bars, Ray's own lines, actor output, trainer dicts.
NOISE = ("FutureWarning", "Loading weights", "INFO worker.py", "PolicyEngine pid=", "{'loss'", "rollouts_start")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", COLUMNS="120")
    return env


def _check(text: str, run_dir: Path) -> None:
    for line in (f"run directory {run_dir}", "round 1 rollouts done in ", ": 3 trees stored, ",
                 "round 1 export done in ", "round 1 train policy done in ", "skipped (train_policy is false"):
        assert line in text, f"{line!r} not on the console:\n{text[-3000:]}"
    shown = [n for n in NOISE if n in text]
    assert not shown, f"{shown} on the console:\n{text[-3000:]}"
    assert (run_dir / "libraries.log").is_file() and (run_dir / "log.jsonl").is_file()
    events = (run_dir / "log.jsonl").read_text()
    assert '"event": "rollouts_start"' in events and '"event": "phase_done"' in events  # every event is kept


def test_plain_lines_on_a_pipe(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "round.py"), *ARGS, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(proc.stdout, run_dir)
    assert "\r" not in proc.stdout  # no bar redraws on a pipe: whole lines only
    assert proc.stderr.strip() == "", proc.stderr[-2000:]


def test_bars_on_a_terminal(tmp_path):
    import pty

    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "round.py"), *ARGS, "--run-dir", str(run_dir)],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=900) == 0, text[-3000:]
    _check(text, run_dir)
    assert "round 1 rollouts:" in text and "/3 [" in text and "\r" in text, text[-3000:]  # a tqdm bar was drawn
