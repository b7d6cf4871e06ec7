"""`ray job submit` against a head node started by the test on loopback: the way users run on a cluster.

The head runs as ``ray start --head --block`` in its own session, so the test stops exactly the processes it
started (the whole process group) instead of ``ray stop``, which would stop every Ray cluster on the machine,
including other test sessions'.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.cluster import REPO_ROOT, job_submit_command

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_processes(marker: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(p))
    return pids


@pytest.fixture
def head_node():
    """A Ray head on 127.0.0.1 with its own ports and temp dir; yields (dashboard url, gcs address, env)."""
    gcs_port, dash_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            f"--dashboard-port={dash_port}",
            # Ports of its own: the session's Ray cluster (tests/conftest.py) may hold the defaults, and an agent
            # that cannot bind 52365 never registers ("No available agent to submit job").
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError(f"ray head did not come up (exit code {head.poll()})") from None
                time.sleep(0.5)
        yield url, f"127.0.0.1:{gcs_port}", env
    finally:
        _stop_node(head, temp_dir)


def _stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop a ``ray start --block`` node and anything of it (by its temp dir) that outlived its process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    for pid in _our_processes(temp_dir):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_round_submitted_as_a_ray_job_on_a_loopback_head(head_node, tmp_path):
    for needed in ("round.py", "configs/tiny.yaml", "pipeline/driver.py"):
        if not (REPO_ROOT / needed).is_file():
            pytest.skip(f"{needed} is not written yet")
    url, gcs, env = head_node

    # A plain driver with RAY_ADDRESS joins the cluster instead of starting one.
    probe = (
        "from pipeline.cluster import connect, disconnect\nfrom pipeline.config import RayConfig\n"
        "c = connect(RayConfig())\nprint('JOINED', c.started, c.joined_job)\ndisconnect(c)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env={**env, "RAY_ADDRESS": gcs},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "JOINED False False" in out.stdout, out.stdout + out.stderr[-2000:]

    run_dir = tmp_path / "run"
    # Round 1 of the tiny preset, shrunk further: this test is about the job plumbing, not the rounds.
    shrink = [
        "problems.n=2",
        "eval.enabled=false",
        "engines.bootstrap_model=tiny-random",
        "rounds.schedule.0.rollouts=1",
        "rounds.schedule.0.children=2",
    ]
    argv = job_submit_command(
        url,
        [
            "python",
            "round.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            "--rounds",
            "1",
            *(a for kv in shrink for a in ("--set", kv)),
        ],
        working_dir=".",
    )
    argv[0] = str(BIN / "ray")
    # The dashboard answers before the node's job agent registers; Ray then refuses the submission with
    # "No available agent to submit job, please try again later" (nothing is submitted), so try again.
    deadline = time.time() + 120
    while True:
        job = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in job.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout + job.stderr, job.stdout[-4000:]

    assert (run_dir / "config.yaml").is_file()
    manifest = json.loads((run_dir / "round_1" / "trees" / "_manifest.json").read_text())
    stored = {pid for shard in manifest["shards"] for pid in shard["problems"]}
    assert len(stored) == 2, manifest
    assert (run_dir / "round_1" / "_done" / "rollouts.json").is_file()
    assert (run_dir / "round_1" / "_SUCCESS").is_file()
