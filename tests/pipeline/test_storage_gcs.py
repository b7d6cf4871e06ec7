"""Run directories on ``gs://``, against a GCS-protocol server (gcp-storage-emulator, tests/conftest.py) reached
through pyarrow's GCS client: commits and their checksums, the run lease, and a run's round trip with work
shipped to another node. The S3 tests (test_storage_s3.py, test_storage_shipping.py) cover the rest of the
same code; this checks that the GCS client behaves as the store layer expects."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from test_storage_s3 import PROBLEMS, driven, manifest, rows
from test_storage_shipping import on_another_node

from pipeline.lease import LEASE_NAME, LeaseHeld
from pipeline.storage import RunDir, atomic_dir, opened_run
from pipeline.storage.remote import ObjectStore
from pipeline.storage.shipping import COMPLETE


def test_commits_checksums_and_the_lease_on_gcs(gcs_bucket):
    uri = f"{gcs_bucket}/runs/x"
    run = driven(uri)
    store = ObjectStore(uri)
    try:
        holder = json.loads(store.read_bytes(LEASE_NAME))
        assert holder["pid"] == os.getpid()
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):  # a second driver is refused, naming us
            RunDir.open(uri).acquire_lease()
    finally:
        run.close()
    assert LEASE_NAME not in store.list(), "the lease was not released"
    shards = manifest(store)["shards"]
    assert [s["problems"] for s in shards] == [["a", "b"], ["c", "d"], ["e"]]
    for s in shards:
        data = store.read_bytes(f"round_1/trees/{s['file']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["size"], s["sha256"]), s["file"]
    again = RunDir.open(uri)
    again.acquire_lease()
    try:
        assert again.trees(1).pending_problem_ids() == []
        assert rows(again) == {p: [f"{p}/{i}" for i in range(PROBLEMS.index(p) + 2)] for p in PROBLEMS}
    finally:
        again.close()


def test_a_run_round_trip_with_work_shipped_to_another_node_on_gcs(gcs_bucket, tmp_path):
    uri = f"{gcs_bucket}/run"
    with opened_run(uri) as run:
        run.write_config("seed: 3\n")
        with atomic_dir(run.round_dir(1) / "inputs") as tmp:
            (tmp / "a.txt").write_text("alpha")
        out = run.policy_dir(1)
        on_another_node(run.ship(shutil.copytree, run.round_dir(1) / "inputs", out, dirs_exist_ok=True,
                                 writes=out), run, tmp_path / "node-b", tmp_path)
        run.fetch(out)
        run.mark_done(1, "train_policy", {"out_dir": str(out)})
    assert f"round_1/policy/{COMPLETE}" in ObjectStore(uri).list("round_1/policy")
    with opened_run(uri, lease=False) as reader:  # what a later process sees
        assert reader.read_config() == "seed: 3\n"
        assert reader.is_done(1, "train_policy") and (reader.policy_dir(1) / "a.txt").read_text() == "alpha"
