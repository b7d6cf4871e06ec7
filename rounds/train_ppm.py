"""PPM training: TRL ``RewardTrainer`` on a round's ``ppm_pairs`` export, with the score squashed by tanh.

    result = train_ppm(policy_dir, run_dir / "round_2/ppm_pairs.parquet", run_dir / "round_2/ppm", cfg.training)

Loss per pair (Bradley-Terry):  -log sigmoid(r(prompt + chosen) - r(prompt + rejected)),  r = tanh(head at
the last token), computed by ``rounds.ppm_model.ppm_rewards``: the very function inference scores with.
The export's ``margin`` column is not used: TRL would subtract it inside the sigmoid, and with r in [-1, 1]
a Q-value margin of up to 2 would leave nothing for the model to learn.

``training.ppm_pair_weight="inverse_count"`` weighs pair i by w_i = 1 / (pos_count_i * neg_count_i), the sizes
of the two sides it was drawn from (rStar-Math, train/rm.py): loss = mean_i(w_i * l_i). rStar sums w_i * l_i
over the batch instead; the two differ by the constant batch size, which the learning rate absorbs.

Truncation: ``training.ppm.max_length`` is the one PPM length; it is recorded in the checkpoint and every
scorer reads it back (``ppm_model.checkpoint_max_length``), so training and scoring read the same tokens.

Pairs are tokenized here with ``ppm_model.encode_texts`` (the same ids inference builds: no EOS appended,
over-long texts keep their end) and handed to the trainer pre-tokenized, so TRL's own preprocessing
(which appends EOS) never runs. A slice of pairs, grouped by problem (``problem_id``; by ``prompt`` in files
without it) so that no problem is on both sides, is held out; pairwise accuracy on it is measured with
``ppm_scores`` on the trained model.

Checkpoint layout, resume and atomic final save: see ``rounds.train_policy``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rounds.ppm_model import encode_texts, init_ppm, ppm_rewards, ppm_scores
from rounds.train_config import TrainingConfig, TrainResult, check_trackers, tracking_callbacks, trainer_arguments
from rounds.train_policy import (
    column_names,
    device_flags,
    finished_result,
    read_columns,
    run_and_save,
    summarize,
    work_dir_for,
)


def split_heldout(groups: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) with whole groups held out, about ``fraction`` of the rows.

    ``groups[i]`` names row i's group (its problem). Groups are ordered by sha256(seed, group), so the split
    is reproducible and independent of row order; groups are taken in that order until the held-out rows
    reach ceil(fraction * rows). At least one group always stays in training, so a one-group file holds
    nothing out.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction={fraction}: must be in [0, 1)")
    rows_of: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows_of.setdefault(g, []).append(i)
    target = math.ceil(fraction * len(groups))
    order = sorted(rows_of, key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    heldout: list[int] = []
    for g in order[:-1]:  # the last group always trains
        if len(heldout) >= target:
            break
        heldout.extend(rows_of[g])
    held = set(heldout)
    return [i for i in range(len(groups)) if i not in held], sorted(heldout)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs scored strictly in the right order (a tie counts as wrong)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pairwise_accuracy: need equal, non-zero counts; got {len(chosen)} and {len(rejected)}")
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)


def pair_weights(pos_count: Sequence[int], neg_count: Sequence[int]) -> list[float]:
    """rStar-Math's per-pair loss weight 1 / (pos x neg) (train/rm.py; 1 / (pos + neg) when a side is 0)."""
    out = []
    for p, n in zip(pos_count, neg_count, strict=True):
        if p < 0 or n < 0 or p + n == 0:
            raise ValueError(f"pos_count={p}, neg_count={n}: counts must be >= 0 and not both 0")
        out.append(1.0 / (p * n) if p and n else 1.0 / (p + n))
    return out


def _tanh_reward_trainer_class():
    # Built on first use so importing this module does not import trl/torch.
    import torch
    import torch.nn.functional as F
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WeightedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator, plus each pair's loss weight (``weight``) when the rows carry one."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            if "weight" in examples[0]:
                out["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float)
            return out

    class TanhRewardTrainer(RewardTrainer):
        """RewardTrainer whose reward is ``ppm_rewards`` (tanh at the last attended token)."""

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            rewards = ppm_rewards(model, inputs["input_ids"], inputs["attention_mask"])  # [2 * pairs]
            # The collator stacks all chosen rows first, then all rejected rows.
            chosen, rejected = rewards.chunk(2)
            per_pair = -F.logsigmoid(chosen - rejected)  # [pairs]
            weight = inputs.get("weight")
            loss = (per_pair * weight.to(per_pair.dtype)).mean() if weight is not None else per_pair.mean()
            with torch.no_grad():
                gathered = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gathered((chosen > rejected).float().mean()).mean().item())
                self._metrics[mode]["margin"].append(gathered((chosen - rejected).mean()).mean().item())
                self._metrics[mode]["mean_reward"].append(gathered(rewards.mean()).mean().item())
            return (loss, {"rewards": rewards}) if return_outputs else loss

    return TanhRewardTrainer, WeightedPreferenceCollator


def train_ppm(init_model: str | Path, pairs_path: Path, out_dir: Path, cfg: TrainingConfig,
              callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train a PPM on the prompt/chosen/rejected rows of ``pairs_path``; the final checkpoint goes to ``out_dir``.

    ``init_model``: a policy checkpoint (a fresh scalar head is added) or, when continuing across rounds, a
    previous PPM (its head is kept); choose with ``train_config.init_checkpoint``. The result carries the
    held-out pairwise accuracy. ``callbacks``: transformers ``TrainerCallback``s.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    done = finished_result(out_dir)
    if done is not None:
        return done

    check_trackers(cfg)
    from datasets import Dataset
    from trl import RewardConfig

    pairs_path = Path(pairs_path)
    data = read_columns(pairs_path, ("prompt", "chosen", "rejected"), "ppm_pairs")
    groups = data["prompt"]
    if "problem_id" in column_names(pairs_path):
        groups = read_columns(pairs_path, ("problem_id",), "ppm_pairs")["problem_id"]
    train_idx, held_idx = split_heldout(groups, cfg.heldout_fraction, cfg.seed)
    stage = cfg.ppm
    # stage.max_length is THE PPM length: recorded in the checkpoint, read back by every scorer.
    model, tok = init_ppm(init_model, seed=cfg.seed, max_length=stage.max_length)

    def texts(column: str, idx: list[int]) -> list[str]:
        return [data["prompt"][i] + data[column][i] for i in idx]

    chosen_ids, cut_c = encode_texts(tok, texts("chosen", train_idx), stage.max_length)
    rejected_ids, cut_r = encode_texts(tok, texts("rejected", train_idx), stage.max_length)
    columns = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if cfg.ppm_pair_weight == "inverse_count":
        missing = {"pos_count", "neg_count"} - set(column_names(pairs_path))
        if missing:
            raise ValueError(f"{pairs_path}: training.ppm_pair_weight='inverse_count' needs columns {sorted(missing)}; "
                             f"re-export the round (python -m pipeline export) or use ppm_pair_weight='uniform'")
        import pyarrow.parquet as pq

        counts = pq.read_table(pairs_path, columns=["pos_count", "neg_count"])
        weights = pair_weights(counts.column("pos_count").to_pylist(), counts.column("neg_count").to_pylist())
        columns["weight"] = [weights[i] for i in train_idx]
    train_set = Dataset.from_dict(columns)
    args = RewardConfig(
        **trainer_arguments(cfg, stage, work_dir_for(out_dir), **device_flags()),
        max_length=None,  # already cut by encode_texts (keeping the end); TRL would drop the pair instead
        disable_dropout=True,
    )
    trainer_class, collator_class = _tanh_reward_trainer_class()
    collator = collator_class(pad_token_id=tok.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, processing_class=tok,
                            data_collator=collator, callbacks=list(callbacks) + tracking_callbacks(cfg, out_dir))

    def make_result(train_output, resumed_from: str) -> TrainResult:
        accuracy = -1.0
        if held_idx:
            # The inference scorer's own function on the trained model: the number the search will see.
            def score(column: str) -> list[float]:
                return ppm_scores(trainer.model, tok, texts(column, held_idx), batch_size=stage.batch_size * 2,
                                  max_length=stage.max_length)

            accuracy = pairwise_accuracy(score("chosen"), score("rejected"))
        return summarize("ppm", trainer, train_output, out_dir, len(train_idx), started, resumed_from,
                         truncated_rows=len(set(cut_c) | set(cut_r)), pairwise_accuracy=accuracy, heldout_pairs=len(held_idx))

    return run_and_save(trainer, out_dir, cfg, make_result)
