"""Policy SFT on the tiny random model: the loss falls, the weights change, the final checkpoint is written
atomically and reloads, and a run interrupted after a trainer checkpoint resumes to the same total steps."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from crash_after_save import Crash, CrashAfterSave
from transformers import AutoModelForCausalLM

from rounds.models import resolve_model
from rounds.train_config import StageConfig, TrainingConfig
from rounds.train_policy import (
    RESULT_FILE,
    build_sft_trainer,
    finished_result,
    last_complete_checkpoint,
    loss_curve,
    read_columns,
    train_policy,
    work_dir_for,
)

STEPS = 4


def write_sft(path, n=8):
    rows = {
        "prompt": [f"Question: what is {i} + {i}?\n" for i in range(n)],
        "completion": [f"# add the numbers\nx = {i} + {i}\nprint(x)\n# output: {2 * i}\n<end_of_step>\n"
                       f"# The answer is \\boxed{{{2 * i}}}\n<end_of_answer>\n" for i in range(n)],
        "q_mean": [0.5] * n,  # metadata columns ride along and are ignored
    }
    pq.write_table(pa.table(rows), path)
    return path


def tiny_cfg(**kw):
    kw.setdefault("policy", StageConfig(epochs=1, lr=1e-3, batch_size=4, max_steps=STEPS, max_length=128,
                                        warmup_ratio=0.0))
    return TrainingConfig(logging_steps=1, save_steps=2, **kw)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Train, crash after checkpoint-2, then call again: the second call resumes and finishes."""
    root = tmp_path_factory.mktemp("policy")
    sft = write_sft(root / "sft.parquet")
    out = root / "round_1" / "policy"
    with pytest.raises(Crash):
        train_policy("tiny-random", sft, out, tiny_cfg(), callbacks=[CrashAfterSave(2)])
    after_crash = {
        "out_exists": out.exists(),
        "checkpoints": sorted(p.name for p in work_dir_for(out).glob("checkpoint-*")),
    }
    result = train_policy("tiny-random", sft, out, tiny_cfg())
    return root, sft, out, after_crash, result


def test_a_crash_leaves_no_final_checkpoint_only_trainer_checkpoints(resumed_run):
    _, _, _, after_crash, _ = resumed_run
    assert after_crash["out_exists"] is False
    assert after_crash["checkpoints"] == ["checkpoint-2"]


def test_resume_reaches_the_same_total_steps(resumed_run):
    _, _, _, _, result = resumed_run
    assert result.resumed_from.endswith("checkpoint-2"), result.resumed_from
    assert result.steps == STEPS
    # logging_steps=1: one loss per step, the two before the crash restored from the checkpoint's state.
    assert len(result.losses) == STEPS, result.losses


def test_loss_falls_and_weights_change(resumed_run):
    _, _, out, _, result = resumed_run
    assert result.losses[-1] < result.losses[0], result.losses
    assert result.final_loss == result.losses[-1]
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random"))
    tuned = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters(), strict=True)
               if not torch.equal(a, b)]
    assert "model.layers.0.self_attn.q_proj.weight" in changed, changed
    assert "model.embed_tokens.weight" in changed


def test_final_checkpoint_is_complete_and_the_scaffolding_is_gone(resumed_run):
    root, _, out, _, result = resumed_run
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    stored = json.loads((out / RESULT_FILE).read_text())
    assert stored["steps"] == STEPS and stored["kind"] == "policy" and stored["train_rows"] == 8
    assert not work_dir_for(out).exists()  # keep_checkpoints=False
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]  # no .policy.tmp left behind


def test_a_finished_checkpoint_is_not_trained_again(resumed_run):
    _, sft, out, _, result = resumed_run
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = train_policy("tiny-random", sft, out, tiny_cfg())
    assert again == result
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_last_complete_checkpoint_skips_one_cut_short(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    # 12 > 10 but has no trainer_state.json (written last): a crash cut it short.
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_loss_curve_reads_only_training_losses():
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"train_loss": 1.75, "step": 2},
               {"eval_loss": 9.0, "step": 2}]
    assert loss_curve(history) == (2.0, 1.5)


def test_no_result_file_means_not_finished(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a half-copied checkpoint, say
    assert finished_result(tmp_path) is None


def test_bad_sft_files_are_reported_with_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="sft data .*nope.parquet: not found"):
        read_columns(tmp_path / "nope.parquet", ("prompt", "completion"), "sft")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["a"]}), p)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['completion'\]"):
        read_columns(p, ("prompt", "completion"), "sft")
    pq.write_table(pa.table({"prompt": ["q"], "completion": [3]}), p)
    with pytest.raises(ValueError, match="column 'completion' is int64, must be a string column"):
        read_columns(p, ("prompt", "completion"), "sft")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}), p)
    with pytest.raises(ValueError, match="0 rows, nothing to train on"):
        read_columns(p, ("prompt", "completion"), "sft")
    pq.write_table(pa.table({"prompt": ["q", None], "completion": ["a", "b"]}), p)
    with pytest.raises(ValueError, match="row 1 has a null 'prompt'"):
        read_columns(p, ("prompt", "completion"), "sft")


def test_resumed_weights_equal_an_uninterrupted_run(resumed_run):
    # The trainer checkpoint restores optimizer, scheduler, RNG and data order: resuming is exact.
    root, sft, out, _, result = resumed_run
    straight = train_policy("tiny-random", sft, root / "straight" / "policy", tiny_cfg())
    assert straight.losses == pytest.approx(result.losses, abs=1e-6)
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(root / "straight" / "policy")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_loss_is_on_the_completion_only(tmp_path):
    data = {"prompt": ["Question: 2 + 2?\n"], "completion": ["# add\nx = 2 + 2\n<end_of_step>\n"]}
    trainer, truncated = build_sft_trainer("tiny-random", data, tmp_path / "policy", tiny_cfg())
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    n_prompt = len(tok(data["prompt"][0])["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt  # no loss on the prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]  # loss on every completion token
    assert row["input_ids"][-1] == tok.eos_token_id  # TRL appends EOS: the policy learns to stop
    assert truncated == 0
    _, cut = build_sft_trainer("tiny-random", data, tmp_path / "policy", tiny_cfg(policy=StageConfig(max_length=8)))
    assert cut == 1


def test_plain_sft_loss_equals_trls_fused_head_on_the_same_batch(tmp_path):
    # training.sft_loss: plain (the CPU default) must train on the same objective as TRL's fused LM head: the mean
    # cross entropy over the completion tokens (+ EOS), the prompt masked.
    data = {"prompt": [f"Question: what is {i} + {i}?\n" for i in range(4)],
            "completion": [f"x = {i} + {i}\nprint(x)\n<end_of_answer>\n" for i in range(4)]}
    losses = {}
    for kind in ("plain", "trl"):
        trainer, _ = build_sft_trainer("tiny-random", data, tmp_path / kind, tiny_cfg(sft_loss=kind, precision="fp32"))
        assert (type(trainer).__name__ == "PlainLossSFTTrainer") == (kind == "plain")
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any(), "prompt masked, completion kept"
        with torch.no_grad():
            losses[kind] = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert losses["plain"] == pytest.approx(losses["trl"], rel=1e-5), losses
