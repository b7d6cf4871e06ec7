"""How a run meets Ray: which address wins, what a job uploads, and that we only stop what we started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.cluster import JOB_EXCLUDES, REPO_ROOT, job_runtime_env, job_submit_command, resolve_address
from pipeline.config import RayConfig


def test_config_address_wins_over_ray_address_and_empty_means_local():
    assert (
        resolve_address(RayConfig(address="ray://head:10001"), {"RAY_ADDRESS": "10.0.0.1:6379"}) == "ray://head:10001"
    )
    assert resolve_address(RayConfig(), {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert resolve_address(RayConfig(), {}) == ""


def test_job_upload_excludes_the_virtualenv_and_run_outputs():
    env = job_runtime_env("/repo")
    assert env["working_dir"] == "/repo"
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    argv = job_submit_command("http://127.0.0.1:8265", ["python", "round.py", "--config", "configs/tiny.yaml"])
    assert argv[:3] == ["ray", "job", "submit"] and argv[argv.index("--") + 1 :][:2] == ["python", "round.py"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["excludes"] == list(JOB_EXCLUDES)


def test_repo_root_is_the_checkout():
    assert (REPO_ROOT / "pipeline" / "cluster.py").is_file()


def test_local_cluster_starts_with_auth_off_and_workers_import_the_repo(tmp_path):
    # A fresh interpreter started outside the repo: an actor imports pipeline.cluster from the checkout, a
    # nested connect reuses the connection, and the cluster we started is shut down by ray_cluster.
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, ray\n"
        "from pipeline.cluster import connect, ray_cluster\n"
        "from pipeline.config import RayConfig\n"
        "with ray_cluster(RayConfig(num_cpus=1)) as c:\n"
        "    @ray.remote(num_cpus=0)\n"
        "    def where():\n"
        "        import pipeline.cluster\n"
        "        return pipeline.cluster.__file__\n"
        "    print('started', c.started, os.environ.get('RAY_AUTH_MODE'))\n"
        "    print('worker', ray.get(where.remote()))\n"
        "    with connect(RayConfig()) as inner:\n"
        "        pass\n"
        "    print('inner', inner.owned, ray.is_initialized())\n"
        "print('after', ray.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "started True disabled" in lines, out.stdout
    assert f"worker {Path(REPO_ROOT, 'pipeline', 'cluster.py')}" in lines, out.stdout
    assert "inner False True" in lines, out.stdout  # a nested connect leaves the outer connection alone
    assert "after False" in lines, out.stdout
