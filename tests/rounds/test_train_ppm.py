"""PPM training on the tiny random model: the pairwise tanh loss falls, backbone and head change, held-out
pairwise accuracy is measured with the inference scorer, the checkpoint reloads and scores identically,
and an interrupted run resumes to the same total steps."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from crash_after_save import Crash, CrashAfterSave
from transformers import AutoModelForCausalLM

from rounds.models import resolve_model
from rounds.ppm_model import load_ppm, ppm_scores
from rounds.train_config import StageConfig, TrainingConfig
from rounds.train_policy import work_dir_for
from rounds.train_ppm import pairwise_accuracy, split_heldout, train_ppm

N_PAIRS = 16  # 8 prompts x 2 pairs each
STEPS = 6


def write_pairs(path):
    # chosen adds (right), rejected multiplies (wrong): a pattern the tiny model can pick up in a few steps.
    n = N_PAIRS
    rows = {
        "prompt": [f"Question: what is {i // 2} + {i // 2}?\n" for i in range(n)],
        "chosen": [f"# add them\nx = {i} + {i}\n<end_of_step>\n" for i in range(n)],
        "rejected": [f"# multiply\ny = {i} * 7 - 1\n<end_of_step>\n" for i in range(n)],
        "margin": [2.0] * n,  # ignored: see train_ppm's module doc
        "q_chosen": [1.0] * n,
        "q_rejected": [-1.0] * n,
        "problem_id": [f"p{i // 4}" for i in range(n)],  # 4 problems x 2 prefixes x 2 pairs: groups of 4 rows
    }
    pq.write_table(pa.table(rows), path)
    return path, rows


def tiny_cfg():
    stage = StageConfig(epochs=1, lr=3e-3, batch_size=4, max_steps=STEPS, max_length=64, warmup_ratio=0.0)
    return TrainingConfig(ppm=stage, logging_steps=1, save_steps=3, heldout_fraction=0.25)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppm")
    pairs, rows = write_pairs(root / "ppm_pairs.parquet")
    out = root / "round_1" / "ppm"
    with pytest.raises(Crash):
        train_ppm("tiny-random", pairs, out, tiny_cfg(), callbacks=[CrashAfterSave(3)])
    checkpoints = sorted(p.name for p in work_dir_for(out).glob("checkpoint-*"))
    result = train_ppm("tiny-random", pairs, out, tiny_cfg())
    return rows, out, checkpoints, result


def test_split_holds_out_whole_groups():
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    train, held = split_heldout(prompts, 0.25, seed=0)
    # ceil(0.25 * 8) = 2 rows = exactly one group of two
    assert len(held) == 2 and prompts[held[0]] == prompts[held[1]]
    assert sorted(train + held) == list(range(8))
    assert {prompts[i] for i in train}.isdisjoint({prompts[i] for i in held})
    # Reproducible and independent of row order: the same group is held out.
    again = split_heldout(prompts[::-1], 0.25, seed=0)[1]
    assert {prompts[::-1][i] for i in again} == {prompts[i] for i in held}


def test_split_edge_cases():
    assert split_heldout(["a", "b", "c"], 0.0, seed=0) == ([0, 1, 2], [])
    assert split_heldout(["a", "a", "a"], 0.5, seed=0) == ([0, 1, 2], [])  # one group always trains
    # ceil(0.1 * 3) = 1 row -> one whole group; at most 2 of the 3 groups could go.
    train, held = split_heldout(["a", "b", "c"], 0.1, seed=3)
    assert len(held) == 1 and len(train) == 2
    with pytest.raises(ValueError, match="heldout_fraction=1.0"):
        split_heldout(["a"], 1.0, seed=0)


def test_pairwise_accuracy_counts_ties_as_wrong():
    # pairs: 0.5>0.1 right, 0.2<0.3 wrong, 0.4=0.4 tie (wrong), -0.1>-0.9 right -> 2/4
    assert pairwise_accuracy([0.5, 0.2, 0.4, -0.1], [0.1, 0.3, 0.4, -0.9]) == 0.5
    with pytest.raises(ValueError):
        pairwise_accuracy([], [])


def test_interrupted_training_resumes_to_the_same_total(run):
    _, out, checkpoints, result = run
    assert checkpoints == ["checkpoint-3"]
    assert result.resumed_from.endswith("checkpoint-3")
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert not work_dir_for(out).exists()


def test_loss_falls(run):
    _, _, _, result = run
    assert result.kind == "ppm"
    # 6 logged steps; compare the ends of the curve (single steps are noisy with batch 4).
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first, result.losses
    # The pairwise loss with rewards in [-1, 1] is bounded below by -log sigmoid(2) = 0.1269.
    assert min(result.losses) >= -math.log(1 / (1 + math.exp(-2))) - 1e-4


def test_backbone_and_head_change(run):
    _, out, _, _ = run
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random"))
    ppm, _ = load_ppm(out)
    assert not torch.equal(base.model.layers[1].mlp.down_proj.weight, ppm.model.layers[1].mlp.down_proj.weight)
    assert ppm.score.weight.abs().sum() > 0


def test_heldout_accuracy_is_what_the_reloaded_scorer_gives(run):
    rows, out, _, result = run
    # 4 problems of 4 pairs; ceil(0.25 * 16) = 4 rows = one whole problem held out (both its prefixes).
    assert result.heldout_pairs == 4 and result.train_rows == N_PAIRS - 4
    _, held = split_heldout(rows["problem_id"], 0.25, seed=0)
    assert len({rows["problem_id"][i] for i in held}) == 1 and len({rows["prompt"][i] for i in held}) == 2
    model, tok = load_ppm(out)
    chosen = ppm_scores(model, tok, [rows["prompt"][i] + rows["chosen"][i] for i in held], batch_size=8)
    rejected = ppm_scores(model, tok, [rows["prompt"][i] + rows["rejected"][i] for i in held], batch_size=8)
    assert all(-1.0 <= s <= 1.0 for s in chosen + rejected)
    assert pairwise_accuracy(chosen, rejected) == result.pairwise_accuracy
    # Same model, same batches: reloading gives identical scores, call after call.
    again, _ = load_ppm(out)
    assert ppm_scores(again, tok, [rows["prompt"][i] + rows["chosen"][i] for i in held], batch_size=8) == chosen


def test_missing_pairs_columns_are_reported(tmp_path):
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"]}), p)
    with pytest.raises(ValueError, match=r"ppm_pairs data .*missing column\(s\) \['rejected'\]"):
        train_ppm("tiny-random", p, tmp_path / "ppm", tiny_cfg())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_training_scores_like_the_cpu(tmp_path):
    pairs, rows = write_pairs(tmp_path / "ppm_pairs.parquet")
    result = train_ppm("tiny-random", pairs, tmp_path / "ppm", tiny_cfg())  # device="auto" -> cuda, bf16
    assert result.steps == STEPS and 0.0 <= result.pairwise_accuracy <= 1.0
    texts = [p + c for p, c in zip(rows["prompt"], rows["chosen"], strict=True)]
    gpu_model, tok = load_ppm(tmp_path / "ppm", device="cuda")
    cpu_model, _ = load_ppm(tmp_path / "ppm")
    on_gpu = ppm_scores(gpu_model, tok, texts)
    assert on_gpu == pytest.approx(ppm_scores(cpu_model, tok, texts), abs=1e-2)  # TF32 matmuls on the GPU


def test_the_checkpoint_records_the_one_truncation_length_scorers_use(run):
    from rounds.ppm_model import checkpoint_max_length

    _, out, _, _ = run
    assert checkpoint_max_length(out) == 64  # tiny_cfg's training.ppm.max_length, read back for scoring


def test_pair_weights_by_hand():
    from rounds.train_ppm import pair_weights

    # 2 x 2 sides -> 1/4; 1 x 4 (a widened side) -> 1/4; 1 x 1 -> 1; a side of 0 -> 1 / (0 + 3) (train/rm.py)
    assert pair_weights([2, 1, 1, 0], [2, 4, 1, 3]) == [0.25, 0.25, 1.0, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="pos_count=0, neg_count=0"):
        pair_weights([0], [0])


def test_inverse_count_weighting_scales_each_pair_loss(tmp_path):
    import dataclasses

    path, rows = write_pairs(tmp_path / "pairs.parquet")
    table = pq.read_table(path)
    weighted_path = tmp_path / "weighted.parquet"
    n = table.num_rows
    pq.write_table(table.append_column("pos_count", pa.array([2] * n, pa.int32()))
                        .append_column("neg_count", pa.array([2] * n, pa.int32())), weighted_path)
    stage = StageConfig(epochs=1, lr=3e-3, batch_size=4, max_steps=1, max_length=64, warmup_ratio=0.0)
    cfg = TrainingConfig(ppm=stage, logging_steps=1, save_steps=3, heldout_fraction=0.0)
    uniform = train_ppm("tiny-random", weighted_path, tmp_path / "u", cfg)
    weighted = train_ppm("tiny-random", weighted_path, tmp_path / "w",
                         dataclasses.replace(cfg, ppm_pair_weight="inverse_count"))
    # Same seed, data order and first batch: every pair weighs 1 / (2 x 2), so the first loss is a quarter.
    assert weighted.losses[0] == pytest.approx(uniform.losses[0] / 4, rel=1e-4)
    with pytest.raises(ValueError, match=r"needs columns \['neg_count', 'pos_count'\]"):
        train_ppm("tiny-random", path, tmp_path / "x", dataclasses.replace(cfg, ppm_pair_weight="inverse_count"))
