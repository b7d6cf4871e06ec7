"""An ask the cluster cannot hold fails at once, naming the resource, the ask and the supply (issue 18)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cluster import rollout_needs, shortfall
from pipeline.config import RayConfig

ROOT = Path(__file__).resolve().parents[2]


def test_needs_add_engines_scorers_and_workers():
    cfg = RayConfig(policy_engines=2, cpus_per_engine=1.5, gpus_per_engine=0.5, cpus_per_scorer=1.0,
                    gpus_per_scorer=0.25, cpus_per_worker=0.5)
    # CPU: 2 engines x 1.5 + 1 scorer x 1 + 3 workers x 0.5 = 3 + 1 + 1.5 = 5.5; GPU: 2 x 0.5 + 1 x 0.25 = 1.25
    assert rollout_needs(cfg, workers=3, scorers=1) == {"CPU": 5.5, "GPU": 1.25}
    assert shortfall(cfg, 3, 1, {"CPU": 5.5, "GPU": 1.25}) is None  # exactly enough fits


def test_shortfall_names_the_key_the_ask_and_the_supply():
    why = shortfall(RayConfig(cpus_per_engine=64), workers=1, scorers=0, have={"CPU": 2.0})
    # 1 engine x 64 + 1 worker x 1 = 65 CPUs asked, 2 there; no GPU asked, so none is named
    assert why is not None and "ray.cpus_per_engine=64" in why and "65 CPU needed, 2 in the cluster" in why, why
    assert "GPU needed" not in why
    gpu = shortfall(RayConfig(gpus_per_engine=1.0), workers=1, scorers=0, have={"CPU": 8.0})
    assert gpu is not None and "1 GPU needed, 0 in the cluster" in gpu and "CPU needed" not in gpu, gpu


def test_round_py_fails_in_seconds_with_exit_1_when_the_local_cluster_is_too_small(tmp_path):
    # The tiny preset on a 2-CPU local cluster, asking 64 CPUs per engine: before issue 18 this warned and then
    # waited out rollouts.startup_timeout_s (900 s) after evaluating round 0.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "round.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--run-dir", str(tmp_path / "run"), "--set", "ray.cpus_per_engine=64", "--rounds", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # 1 engine x 64 + 1 worker x 0.5 (tiny.yaml) = 64.5 CPUs asked of ray.num_cpus=2
    assert err and "ray.cpus_per_engine=64" in err[0] and "64.5 CPU needed, 2 in the cluster" in err[0], proc.stderr
    # Ray's start-up is most of it (seconds; more on a loaded machine), never the 900 s startup timeout.
    assert wall < 120, wall
    assert not (tmp_path / "run" / "round_0" / "eval.json").exists()  # nothing was evaluated first
