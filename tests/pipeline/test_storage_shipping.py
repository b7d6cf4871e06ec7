"""Work shipped to another node of a run on object storage (``pipeline.storage.shipping``), against moto.

"Another node" here is a fresh interpreter given only the pickled call (what Ray sends a task), with a node cache
of its own, run while the driver's staging copy is renamed out of sight: whatever it reads or writes has to go
through the store. Checked: the shipped call names no staging path; outputs arrive on the store with
``_COMPLETE.json``; the driver fetches them and its round goes on (markers, lineage); a complete output is not
uploaded again, an incomplete one is redone and its stale objects removed, a finished one whose upload was cut
short is published from the node's copy instead of redone; inputs are downloaded once per node
and again when the driver changed them; and real training (policy SFT, then a PPM from that policy, whose weights
the driver's copy never holds) runs that way.
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.storage import RunDir, atomic_dir, atomic_write_text
from pipeline.storage.remote import WEIGHT_SUFFIXES, ObjectStore
from pipeline.storage.shipping import COMPLETE, NODE_CACHE_ENV

_NODE = "import pickle, sys\ncall = pickle.load(open(sys.argv[1], 'rb'))\npickle.dump(call(), open(sys.argv[2], 'wb'))\n"


@contextlib.contextmanager
def out_of_sight(run: RunDir):
    """The driver's staging copy renamed away for the duration: a path into it cannot be read or written."""
    away = run.root.with_name(run.root.name + "-away")
    run.root.rename(away)
    try:
        yield
    finally:
        away.rename(run.root)


def on_another_node(call, run: RunDir, cache: Path, tmp_path: Path, timeout: float = 300):
    """Run ``call`` as a Ray task on a node without the driver's files would, and return its result."""
    blob = pickle.dumps(call)
    assert run.root.name.encode() not in blob, "the shipped call names the driver's staging copy"
    (tmp_path / "call.pkl").write_bytes(blob)
    env = {**__import__("os").environ, NODE_CACHE_ENV: str(cache)}
    with out_of_sight(run):
        done = subprocess.run([sys.executable, "-c", _NODE, str(tmp_path / "call.pkl"), str(tmp_path / "result.pkl")],
                              env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the shipped call failed on the other node:\n{done.stderr[-4000:]}"
    return pickle.loads((tmp_path / "result.pkl").read_bytes())


@pytest.fixture
def driven(s3_bucket):
    run = RunDir.open(f"{s3_bucket}/run")
    run.acquire_lease()
    yield run
    run.close()


def test_output_reaches_the_store_complete_and_the_driver_fetches_it(driven, tmp_path):
    import shutil

    run, store = driven, ObjectStore(driven.location)
    src, out = run.round_dir(1) / "inputs", run.round_dir(1) / "copied"
    with atomic_dir(src) as tmp:  # committed by the driver: uploaded at once
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.safetensors").write_bytes(b"w" * 100)
    call = run.ship(shutil.copytree, src, out, dirs_exist_ok=True, writes=out)
    written = on_another_node(call, run, tmp_path / "node-b", tmp_path)
    assert Path(written).is_relative_to(tmp_path / "node-b"), f"the output was written at {written}, not in the cache"
    objects = store.list("round_1/copied")
    assert objects.keys() == {"round_1/copied/a.txt", "round_1/copied/sub/w.safetensors",
                              f"round_1/copied/{COMPLETE}"}, objects
    import json

    assert json.loads(store.read_bytes(f"round_1/copied/{COMPLETE}"))["files"] == {"a.txt": 5, "sub/w.safetensors": 100}
    assert not out.exists()
    run.fetch(out)  # the driver's copy: everything but weights
    assert (out / "a.txt").read_text() == "alpha" and not (out / "sub" / "w.safetensors").exists()
    run.mark_done(1, "export", {"out_dir": str(out)})
    assert store.read_bytes("round_1/_done/export.json") is not None

    # Shipped again (a resumed driver): the store's copy is complete, so it is reused and nothing is uploaded.
    before = store.entries("round_1/copied")
    time.sleep(1.1)  # object times have 1 s resolution: a new PUT would show
    on_another_node(call, run, tmp_path / "node-b", tmp_path)
    assert store.entries("round_1/copied") == before, "a complete output was uploaded again"

    # An upload cut short (no _COMPLETE.json) next to a stale object: redone, the stale object deleted.
    store.delete(f"round_1/copied/{COMPLETE}")
    store.write_bytes("round_1/copied/stale.bin", b"old")
    on_another_node(call, run, tmp_path / "node-c", tmp_path)
    assert set(store.list("round_1/copied")) == set(objects), store.list("round_1/copied")


def test_a_finished_output_whose_upload_was_cut_short_is_published_not_redone(driven, tmp_path, monkeypatch):
    from pipeline.storage import StorageError
    from pipeline.storage.shipping import NodeCache

    run, store = driven, ObjectStore(driven.location)
    rel = "round_1/policy"
    local = NodeCache(run.location, tmp_path / "node").prepare_output(rel)
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(b"w" * 100)
    real_put, puts = ObjectStore.put_file, []

    def cut(self, path, key):  # the node dies after its first upload
        puts.append(key)
        if len(puts) > 1:
            raise StorageError("connection reset")
        real_put(self, path, key)

    monkeypatch.setattr(ObjectStore, "put_file", cut)
    with pytest.raises(StorageError):
        NodeCache(run.location, tmp_path / "node").publish(rel)
    monkeypatch.setattr(ObjectStore, "put_file", real_put)
    assert not store.entries(f"{rel}/{COMPLETE}")

    retry = NodeCache(run.location, tmp_path / "node")  # the retried call, on the same node
    assert retry.prepare_output(rel) == local
    assert (local / "model.safetensors").read_bytes() == b"w" * 100, "the finished output was thrown away"
    retry.publish(rel)
    assert set(store.list(rel)) == {f"{rel}/config.json", f"{rel}/model.safetensors", f"{rel}/{COMPLETE}"}

    # A copy that changed after the call finished (or that no finished call recorded) is not trusted: emptied.
    other = "round_2/policy"
    out = retry.prepare_output(other)
    out.mkdir()
    (out / "config.json").write_text("{}")
    monkeypatch.setattr(ObjectStore, "put_file", lambda *a: (_ for _ in ()).throw(StorageError("down")))
    with pytest.raises(StorageError):
        retry.publish(other)
    monkeypatch.setattr(ObjectStore, "put_file", real_put)
    (out / "config.json").write_text('{"touched": 1}')
    assert not retry.prepare_output(other).exists(), "a copy that changed after its call finished was kept"


def test_inputs_are_downloaded_once_per_node_and_again_when_the_driver_changes_them(driven, tmp_path):
    import shutil

    run = driven
    src, out = run.round_dir(1) / "inputs", run.round_dir(1) / "copied"
    with atomic_dir(src) as tmp:
        (tmp / "a.txt").write_text("one")
    # Written by another process of the driver's node (no publisher saw it): ship uploads it before shipping.
    (src / "late.txt").write_text("late")
    call = run.ship(shutil.copytree, src, out, dirs_exist_ok=True, writes=out)
    assert "round_1/inputs/late.txt" in ObjectStore(run.location).list("round_1/inputs")
    node = tmp_path / "node-b"
    on_another_node(call, run, node, tmp_path)
    cached = next(node.glob("*/round_1/inputs/a.txt"))
    stamp = cached.stat().st_mtime_ns
    on_another_node(call, run, node, tmp_path)
    assert cached.stat().st_mtime_ns == stamp, "an input this node already held was downloaded again"
    time.sleep(1.1)
    atomic_write_text(src / "a.txt", "two")  # the driver changes the input; its commit uploads it
    on_another_node(call, run, node, tmp_path)
    assert cached.read_text() == "two"
    run.fetch(out)
    assert (out / "a.txt").read_text() == "two" and (out / "late.txt").read_text() == "late"


@pytest.mark.slow
def test_policy_then_ppm_trained_on_other_nodes_travel_through_the_store(driven, tmp_path):
    """Round 1's training phases as Ray tasks on GPU nodes would run them, each on a node of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rounds.schedule import Lineage, RoundSpec
    from rounds.train_config import StageConfig, TrainingConfig
    from rounds.train_policy import RESULT_FILE, train_policy
    from rounds.train_ppm import train_ppm

    run, store = driven, ObjectStore(driven.location)
    stage = StageConfig(epochs=1, lr=1e-3, batch_size=4, max_steps=2, max_length=64, warmup_ratio=0.0)
    cfg = TrainingConfig(policy=stage, ppm=stage, logging_steps=1, save_steps=10, heldout_fraction=0.25)
    run.round_dir(1).mkdir(parents=True)
    sft = run.round_dir(1) / "sft_train.parquet"
    pq.write_table(pa.table({"prompt": [f"what is {i} + {i}?\n" for i in range(8)],
                             "completion": [f"x = {i} + {i}\n<end_of_step>\n\\boxed{{{2 * i}}}\n" for i in range(8)]}),
                   sft)  # written without the publisher, as build_sft_data on another process would
    pairs = run.export_path(1, "ppm_pairs")
    pq.write_table(pa.table({"prompt": [f"what is {i // 2} + {i // 2}?\n" for i in range(16)],
                             "chosen": [f"x = {i} + {i}\n" for i in range(16)],
                             "rejected": [f"y = {i} * 7\n" for i in range(16)],
                             "problem_id": [f"p{i // 4}" for i in range(16)]}), pairs)

    policy = run.policy_dir(1)
    t0 = time.perf_counter()
    result = on_another_node(run.ship(train_policy, "tiny-random", sft, policy, cfg, writes=policy), run,
                             tmp_path / "gpu-node-1", tmp_path)
    assert result.steps == 2 and result.out_dir.startswith(str(tmp_path / "gpu-node-1")), result
    run.fetch(policy)
    run.mark_done(1, "train_policy", {"out_dir": str(policy)})
    weights = [k for k in store.list("round_1/policy") if k.endswith(WEIGHT_SUFFIXES)]
    assert weights and f"round_1/policy/{COMPLETE}" in store.list("round_1/policy"), store.list("round_1/policy")
    assert (policy / "config.json").is_file() and (policy / RESULT_FILE).is_file()
    assert not [p for p in policy.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES)], "the driver fetched weights"
    lineage = Lineage([RoundSpec(policy="bootstrap")], run, base_policy="tiny-random", bootstrap="tiny-random",
                      base_ppm="tiny-random")
    assert lineage.ppm_backbone(1) == str(policy)  # the driver's round goes on with its copy of the checkpoint

    # The PPM starts from that policy, on another node: its weights can only come from the store.
    ppm = run.ppm_dir(1)
    scored = on_another_node(run.ship(train_ppm, lineage.ppm_backbone(1), pairs, ppm, cfg, writes=ppm), run,
                             tmp_path / "gpu-node-2", tmp_path)
    assert scored.steps == 2 and scored.heldout_pairs == 4, scored
    assert next((tmp_path / "gpu-node-2").glob("*/round_1/policy/*.safetensors")), "the policy was not downloaded"
    run.fetch(ppm)
    run.mark_done(1, "train_ppm", {"out_dir": str(ppm)})
    assert lineage.newest_ppm(1) == str(ppm)
    assert {"round_1/_done/train_policy.json", "round_1/_done/train_ppm.json", f"round_1/ppm/{COMPLETE}"} \
        <= set(store.list()), sorted(store.list())
    print(f"two trainings on 'other nodes' in {time.perf_counter() - t0:.1f}s")
