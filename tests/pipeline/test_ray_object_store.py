"""Round 2 of the tiny preset on ``s3://`` with all its GPU work on a node that cannot see the driver's files.

Two Ray nodes on 127.0.0.1 (``ray start --block``, as in test_ray_multinode.py): a CPU-only head, which the driver
(``round.py`` with ``RAY_ADDRESS``) joins as a CPU-only driver pod would, and a worker node that declares one GPU
(a logical Ray resource: torch finds no CUDA there and runs on the CPU) and runs in a mount namespace where the
driver's staging root is an empty tmpfs. With ``ray.gpus_per_engine=1`` round 2's policy engine (which loads
round 1's policy checkpoint), its policy training task and its evaluation task need that GPU, so all of them run
on that node, where round 1's checkpoint, the SFT data and the outputs exist only on the store (moto) and in the
node's own cache. Round 1 is set up by this test as a round that solved problems leaves it: SFT rows and a
trained policy (round 1 of the tiny preset solves none, so it would leave no checkpoint to load).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cluster import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests"))
from ray_nodes import two_node_cluster  # noqa: E402
from test_end_to_end import TINY, _alive, _descendants, _kill, _sets, _tail, _wait_gone  # noqa: E402

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 900  # about 3 minutes on a loaded 2-core machine; a hang fails the test
OVERRIDES = ["engines.bootstrap_model=tiny-random", "ray.gpus_per_engine=1", "eval.base_model=false"]


def _round_1_that_solved_problems(uri: str, cfg) -> None:
    """Round 1 as a round that found correct trajectories leaves it: its SFT export, a policy trained on it (here,
    on the driver's node, uploaded as a local run's driver does), every phase marked done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.schemas import SFT_SCHEMA
    from pipeline.config import dump_config
    from pipeline.storage import PHASES, RunDir, atomic_path
    from rounds.train_policy import train_policy

    run = RunDir.open(uri)
    run.acquire_lease()
    try:
        run.write_config(dump_config(cfg))
        rows = [{"prompt": f"Question: what is {i} + 1?\n", "question": f"What is {i} + 1?",
                 "completion": f"x = {i} + 1\nprint(x)\n# output: {i + 1}\n<end_of_step>\n"
                               f"The answer is \\boxed{{{i + 1}}}\n<end_of_answer>\n",
                 "problem_id": f"p{i}", "round": 1, "q_mean": 1.0, "q_min": 1.0, "n_steps": 2, "leaf_id": 3,
                 "behaviours": []} for i in range(4)]
        with atomic_path(run.export_path(1, "sft")) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), tmp)
        train_policy(cfg.engines.policy_model, run.export_path(1, "sft"), run.policy_dir(1), cfg.training)
        for phase in PHASES:
            run.mark_done(1, phase, {"set_up_by": "test"})
        run.mark_round_success(1)
    finally:
        run.close()


def test_round_2_gpu_work_on_a_node_without_the_drivers_files_goes_through_the_store(s3_bucket, tmp_path):
    from pipeline.config import load_config
    from pipeline.storage.remote import ObjectStore
    from pipeline.storage.shipping import COMPLETE

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare --mount failed): the GPU node could not be kept "
                    "from the driver's files")
    uri, staging, node_cache = f"{s3_bucket}/run", tmp_path / "staging", tmp_path / "gpu-node-cache"
    staging.mkdir()
    cfg = load_config(TINY, OVERRIDES)
    _round_1_that_solved_problems(uri, cfg)
    store = ObjectStore(uri)
    assert [k for k in store.list("round_1/policy") if k.endswith(".safetensors")], "round 1's policy is not stored"

    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    log = tmp_path / "round2.log"
    with two_node_cluster(["--num-gpus=0"], ["--num-gpus=1"], {**aws, "OPEN_RSTAR_NODE_CACHE": str(node_cache)},
                          hide=staging) as (gcs, gpu, env), \
            open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "round.py", "--config", TINY, "--rounds", "2", "--run-dir", uri,
                                 *_sets(OVERRIDES)], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, **aws, "RAY_ADDRESS": gcs, "OPEN_RSTAR_STAGING": str(staging),
                                     "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL, start_new_session=True)
        seen: dict[int, float] = {}
        views: set[tuple[bool, bool]] = set()  # (driver sees a staging copy, GPU node sees anything there)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen.update(_descendants(proc.pid))
                with contextlib.suppress(OSError):  # /proc/PID/root: the directory as that node's processes see it
                    views.add((any(staging.iterdir()), any(Path(f"/proc/{gpu.pid}/root{staging}").iterdir())))
                time.sleep(0.5)
            assert proc.poll() is not None, f"round 2 did not finish in {RUN_TIMEOUT_S} s:\n{_tail(log)}"
            assert proc.returncode == 0, f"round 2 exited {proc.returncode}:\n{_tail(log)}"
            assert not _wait_gone(seen), "the driver left processes running"
        finally:
            _kill(proc, {})
            for pid in _alive(seen):
                os.kill(pid, signal.SIGKILL)
    assert (True, False) in views and not any(gpu_saw for _, gpu_saw in views), \
        f"the GPU node was not kept from the driver's staging copy: {views}"

    objects = store.list()
    for phase in ("rollouts", "export", "train_policy", "train_ppm", "eval"):
        assert f"round_2/_done/{phase}.json" in objects, f"round 2's {phase} was not marked done: {sorted(objects)}"
    assert "round_2/_SUCCESS" in objects and "round_2/eval.json" in objects
    import json

    roll = json.loads(store.read_bytes("round_2/_done/rollouts.json"))["info"]
    assert roll["policy"].endswith("/round_1/policy"), roll["policy"]  # the engine loaded round 1's checkpoint...
    engine_copy = next(node_cache.glob("*/round_1/policy"), None)  # ...downloaded on the GPU node
    assert engine_copy is not None and list(engine_copy.glob("*.safetensors")), list(node_cache.rglob("*"))[:20]
    trained = json.loads(store.read_bytes("round_2/_done/train_policy.json"))["info"]
    assert "skipped" not in trained and trained["steps"] == cfg.training.policy.max_steps, trained
    assert f"round_2/policy/{COMPLETE}" in objects and any(
        k.startswith("round_2/policy/") and k.endswith(".safetensors") for k in objects), sorted(objects)
    assert next(node_cache.glob("*/round_2/policy/*.safetensors"), None), "round 2's policy was not trained there"
    ev = json.loads(store.read_bytes("round_2/eval.json"))
    assert ev["models"]["policy"] == trained["out_dir"], (ev["models"], trained["out_dir"])  # the driver's name
    assert ev["metrics"]["greedy_pass1"] is not None, ev["metrics"]
    assert not list(staging.iterdir()), f"the driver left its staging copy: {list(staging.iterdir())}"
