"""Policy SFT: TRL ``SFTTrainer`` on a round's ``sft`` export, loss on the completion only.

    result = train_policy(base_model, run_dir / "round_2/sft.parquet", run_dir / "round_2/policy", cfg.training)

Also the on-disk mechanics both trainers share (``train_ppm`` imports them), so that a crash never leaves
a half-written final checkpoint and training resumes where it stopped:

    round_N/policy.trainer/checkpoint-K/   trainer checkpoints (weights, optimizer, scheduler, RNG, state)
    round_N/.policy.tmp/                   the final model being written
    round_N/policy/                        the final HF checkpoint, renamed into place when complete;
                                           holds train_result.json (the TrainResult) too

A call whose ``out_dir`` already holds a finished checkpoint returns the stored result without training
(the crash window between "checkpoint renamed" and "round marked done"). A call that finds trainer
checkpoints resumes from the newest complete one (one with trainer_state.json, which the Trainer writes
last). The trainer checkpoints are removed after success unless ``keep_checkpoints``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.atomic_io import install_dir
from rounds.models import resolve_model
from rounds.train_config import (
    TrainingConfig,
    TrainResult,
    check_trackers,
    plain_sft_loss,
    tracking_callbacks,
    trainer_arguments,
)

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---- shared run mechanics (policy and PPM) ----


def work_dir_for(out_dir: Path) -> Path:
    """Where the trainer keeps its resumable checkpoints for ``out_dir``."""
    return out_dir.parent / f"{out_dir.name}.trainer"


def finished_result(out_dir: Path) -> TrainResult | None:
    """The stored result when ``out_dir`` is a finished checkpoint, else None."""
    path = out_dir / RESULT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["losses"] = tuple(data["losses"])
    return TrainResult(**data)


def last_complete_checkpoint(work_dir: Path) -> Path | None:
    """The newest ``checkpoint-K`` holding trainer_state.json; one cut short by a crash lacks it."""
    if not work_dir.is_dir():
        return None
    found = []
    for child in work_dir.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


def loss_curve(log_history: list[dict[str, Any]]) -> tuple[float, ...]:
    """Every logged training loss in step order (the Trainer's ``state.log_history``)."""
    return tuple(float(e["loss"]) for e in log_history if "loss" in e and "step" in e)


def device_flags() -> dict[str, bool]:
    """What ``trainer_arguments`` needs to know about this machine (``cpu_bf16``: whether bf16 autocast pays on
    its CPU, for both trainers)."""
    import torch

    from pipeline.engines.fastpath import cpu_has_bf16

    cuda = torch.cuda.is_available()
    return {"cuda_available": cuda, "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
            "cpu_bf16": cpu_has_bf16()}


def run_and_save(trainer, out_dir: Path, cfg: TrainingConfig, make_result) -> TrainResult:
    """Train (resuming from the newest complete trainer checkpoint), then write the final model atomically.

    ``make_result(train_output, resumed_from)`` builds the TrainResult once training is over (the PPM
    evaluates its held-out pairs there, on the trained model, before anything is written).
    """
    work = Path(trainer.args.output_dir)
    resume = last_complete_checkpoint(work)
    if resume is not None:
        log.info("resuming %s from %s", out_dir, resume)
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    result = make_result(train_output, str(resume) if resume is not None else "")

    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    main = trainer.accelerator.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier final save
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every process takes part (sharded models are gathered), main writes
    if main:
        trainer.processing_class.save_pretrained(str(tmp))
        (tmp / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2))
        # An unfinished out_dir (no result file: finished ones return early) is not ours to keep.
        install_dir(tmp, out_dir)
        if not cfg.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result


def summarize(kind: str, trainer, train_output, out_dir: Path, train_rows: int, started: float,
              resumed_from: str, **extra: Any) -> TrainResult:
    losses = loss_curve(trainer.state.log_history)
    mean = float(train_output.training_loss)
    return TrainResult(
        kind=kind,
        out_dir=str(out_dir),
        steps=int(trainer.state.global_step),
        final_loss=losses[-1] if losses else mean,
        mean_loss=mean,
        losses=losses,
        train_rows=train_rows,
        wall_s=round(time.monotonic() - started, 3),
        resumed_from=resumed_from,
        **extra,
    )


def _schema(path: Path):
    import pyarrow.parquet as pq

    return pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema


def column_names(path: Path) -> list[str]:
    return list(_schema(Path(path)).names)


def read_columns(path: Path, columns: Sequence[str], what: str) -> dict[str, list[str]]:
    """The named string columns of a parquet file (or directory of shards); errors name file and column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} data {path}: not found; expected the round's {what} parquet export")
    schema = _schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{what} data {path}: missing column(s) {missing}; has {schema.names}")
    for c in columns:
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ValueError(f"{what} data {path}: column {c!r} is {t}, must be a string column")
    table = pq.read_table(path, columns=list(columns))
    data = {c: table.column(c).to_pylist() for c in columns}
    for c in columns:
        for i, v in enumerate(data[c]):
            if v is None:
                raise ValueError(f"{what} data {path}: row {i} has a null {c!r}")
    if table.num_rows == 0:
        raise ValueError(f"{what} data {path}: 0 rows, nothing to train on (skip training this round instead)")
    return data


# ---- policy SFT ----


def load_sft(path: Path) -> dict[str, list[str]]:
    data = read_columns(path, ("prompt", "completion"), "sft")
    for i, c in enumerate(data["completion"]):
        if not c.strip():
            raise ValueError(f"sft data {path}: row {i} has an empty completion")
    return data


def build_sft_trainer(base_model: str | Path, data: dict[str, list[str]], out_dir: Path, cfg: TrainingConfig,
                      callbacks: Sequence[Any] = ()):
    """(SFTTrainer, rows longer than max_length) for prompt/completion ``data``, the loss on completions only."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = resolve_model(str(base_model))
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    stage = cfg.policy
    lengths = tok([p + c for p, c in zip(data["prompt"], data["completion"], strict=True)])["input_ids"]
    # +1: SFTTrainer appends EOS to each completion.
    truncated = sum(len(ids) + 1 > stage.max_length for ids in lengths)
    flags = device_flags()
    args = SFTConfig(
        **trainer_arguments(cfg, stage, work_dir_for(out_dir), **flags),
        max_length=stage.max_length,
        completion_only_loss=True,
        packing=False,
    )
    plain = plain_sft_loss(cfg, flags["cuda_available"])
    trainer_class = _plain_loss_trainer(cfg.shared_prefix) if plain else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok,
                            callbacks=list(callbacks) + tracking_callbacks(cfg, out_dir))
    return trainer, truncated


def _plain_loss_trainer(shared_prefix: bool):
    """``SFTTrainer`` with transformers' own causal-LM loss (``training.sft_loss: plain``): the same labels (the
    prompt masked with -100, the completion and its EOS counted), the full logits instead of TRL's fused LM head,
    and no entropy / token-accuracy metrics. ``shared_prefix``: a batch's common prefix is computed once
    (``rounds.shared_prefix``) where that applies (one process, no label smoothing or custom loss)."""
    from transformers import Trainer
    from trl import SFTTrainer

    from rounds.shared_prefix import shared_prefix_loss

    class PlainLossSFTTrainer(SFTTrainer):
        shared_prefix_batches = 0  # batches whose prefix was computed once (the rest ran the plain forward)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (shared_prefix and not return_outputs and self.label_smoother is None and self.compute_loss_func is None
                    and self.model_accepts_loss_kwargs and self.accelerator.num_processes == 1):
                loss = shared_prefix_loss(model, inputs, num_items_in_batch)
                if loss is not None:
                    self.shared_prefix_batches += 1
                    return loss
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def train_policy(base_model: str | Path, sft_path: Path, out_dir: Path, cfg: TrainingConfig,
                 callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune ``base_model`` on the prompt/completion rows of ``sft_path``; the final checkpoint goes
    to ``out_dir``. ``base_model`` is anything ``resolve_model`` accepts; choose it with
    ``train_config.init_checkpoint`` (base weights, or the previous round's policy). ``callbacks`` are
    transformers ``TrainerCallback``s (progress reporting; tests use one to interrupt training)."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    done = finished_result(out_dir)
    if done is not None:
        return done

    check_trackers(cfg)
    data = load_sft(Path(sft_path))
    trainer, truncated = build_sft_trainer(base_model, data, out_dir, cfg, callbacks)

    def make_result(train_output, resumed_from: str) -> TrainResult:
        return summarize("policy", trainer, train_output, out_dir, len(data["prompt"]), started, resumed_from,
                         truncated_rows=truncated)

    return run_and_save(trainer, out_dir, cfg, make_result)
