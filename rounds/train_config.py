"""Training config and result records for policy SFT and PPM training (``rounds.train_policy`` / ``train_ppm``).

``TrainingConfig`` holds what both trainers share (seed, precision, checkpointing, from_base) and one
``StageConfig`` per trainer for the numbers that differ between them (rStar-Math trains the policy for
2 epochs and the PPM for 1, both at lr 7e-6). YAML addresses them as ``training.policy.lr`` and
``training.ppm.epochs``.

``trainer_arguments`` turns a stage into the keyword arguments shared by TRL's ``SFTConfig`` and
``RewardConfig``. It is pure: the caller says whether a GPU is present, so the CPU/GPU choice is testable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class StageConfig:
    """The numbers of one trainer (policy SFT or PPM)."""

    epochs: float = 2.0
    lr: float = 7e-6
    batch_size: int = 4  # per device; effective batch = batch_size * grad_accum * devices
    grad_accum: int = 1
    # Tokens per sequence. SFT truncates longer prompt+completion (keeping the start, TRL's rule); the PPM
    # keeps the *end* of longer texts, because its score is read at the last token.
    max_length: int = 1024
    warmup_ratio: float = 0.03  # fraction of the total optimizer steps spent warming up linearly
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    # Optimizer steps of one training run when > 0: transformers' max_steps, which replaces ``epochs`` (a fixed
    # cost per round whatever the row count: 30 steps at batch 2 are 15 epochs over 4 rows, 6 over 10); 0 = epochs decide.
    max_steps: int = 0

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs}: must be > 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps}: must be >= 0 (0 = train for `epochs`)")


def _policy_stage() -> StageConfig:
    return StageConfig(epochs=2.0, lr=7e-6)


def _ppm_stage() -> StageConfig:
    return StageConfig(epochs=1.0, lr=7e-6)


@dataclass(frozen=True)
class TrainingConfig:
    policy: StageConfig = field(default_factory=_policy_stage)
    ppm: StageConfig = field(default_factory=_ppm_stage)
    seed: int = 0
    # True: every round starts from the base weights (rStar-Math's choice); False: from the previous round's
    # checkpoint (a previous PPM keeps its trained head). See ``init_checkpoint``.
    from_base: bool = True
    # Where a new PPM head goes (rStar-Math, paper arXiv 2501.04519, training setup: each round's PPM is initialised from that
    # round's fine-tuned policy, so the driver trains the policy first): "policy" = this round's SFT policy;
    # "base" = engines.ppm_model or the base policy model (this project's earlier rule; pick it for a PPM
    # backbone that differs from the policy). With from_base false a previous PPM is continued either way.
    ppm_init: Literal["policy", "base"] = "policy"
    # PPM loss per pair: "uniform" (every pair the same, the mean over the batch) or "inverse_count"
    # (rStar-Math, train/rm.py ``preprocess_value_dataset`` / ``RMTrainer.compute_loss``): pair i weighs
    # 1 / (pos_count_i * neg_count_i), so every tree node contributes one unit however many pairs it yields.
    ppm_pair_weight: Literal["uniform", "inverse_count"] = "uniform"
    # Fraction of PPM pairs held out (whole problems, so none is on both sides) to measure
    # pairwise accuracy after training; 0 = no held-out measurement.
    heldout_fraction: float = 0.1
    # "auto": bf16 on a GPU that supports it; on CPU, bf16 autocast (fp32 weights and optimizer) for the policy SFT
    # and the PPM where the CPU computes bf16 natively (AMX / AVX-512 BF16; bench/bench_training.py, README
    # "Training speed"; the embedded run's PPM: 1.3-1.5x, same pair accuracy), fp32 on other CPUs.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # The policy SFT's loss: "trl" = TRL's fused LM head (projects only the completion's positions, in tiles, and
    # logs entropy and token accuracy; saves the (batch, seq, vocab) logits' memory on a GPU); "plain" =
    # transformers' own causal-LM loss on the same labels (the same value; on CPU the fused head made a step 1.1x
    # slower in fp32 and ~2x slower under bf16 autocast); "auto" = plain on CPU, trl on a GPU.
    sft_loss: Literal["auto", "trl", "plain"] = "auto"
    # With the plain loss: compute a batch's common token prefix (the search prompt's instruction and examples, the
    # same in every row) once and the rows' own tokens on top of it (``rounds.shared_prefix``): the same loss and
    # gradients up to rounding, for less compute where rows share a long prompt prefix.
    shared_prefix: bool = True
    # "auto": the GPU when one is present, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Trades compute for memory; worth it for 7B models on a GPU, only a slowdown for small ones or on CPU.
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 50  # trainer checkpoint interval (optimizer steps): what a crash can lose
    save_total_limit: int = 2  # >= 2 so a checkpoint cut short by a crash always leaves a complete older one
    keep_checkpoints: bool = False  # keep the trainer checkpoints (optimizer state included) after success
    # Policy SFT data. True: the best correct trajectories found so far for each problem, over all rounds
    # (``rounds.sft_pool``); False: only this round's export.
    policy_pool: bool = True
    # The prompt of each SFT row. "search": the prompt the trained policy will be searched and evaluated with
    # (the later rounds' few-shot setting: a 135M model still needs its examples); "plain": no examples.
    sft_prompt: Literal["search", "plain"] = "search"
    # Experiment tracking through transformers' own integrations (``TrainingArguments.report_to``): () = none;
    # "tensorboard" writes RUN/round_N/tensorboard/{policy,ppm}/ (needs the tensorboard package); "wandb" and
    # "mlflow" log where their own environment says (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...).
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ()

    def __post_init__(self) -> None:
        if self.ppm_pair_weight not in ("uniform", "inverse_count"):
            raise ValueError(f"ppm_pair_weight={self.ppm_pair_weight!r}: must be 'uniform' or 'inverse_count' (rStar-Math)")
        if self.ppm_init not in ("policy", "base"):
            raise ValueError(f"ppm_init={self.ppm_init!r}: must be 'policy' (rStar-Math) or 'base'")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}: must be in [0, 1)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be >= 0")
        for name in ("logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in self.report_to:
            if name not in TRACKERS:
                raise ValueError(f"report_to={list(self.report_to)}: {name!r} is not one of {', '.join(TRACKERS)}")
        if self.sft_loss not in ("auto", "trl", "plain"):
            raise ValueError(f"sft_loss={self.sft_loss!r}: must be 'auto', 'trl' or 'plain'")
        if self.sft_prompt not in ("search", "plain"):
            raise ValueError(f"sft_prompt={self.sft_prompt!r}: must be 'search' or 'plain'")
        if self.save_total_limit < 2:
            raise ValueError(f"save_total_limit={self.save_total_limit}: must be >= 2 (a crash mid-save must "
                             f"leave one complete checkpoint to resume from)")


@dataclass(frozen=True)
class TrainResult:
    """What one training run reports to the round's metrics (``dataclasses.asdict`` gives plain JSON)."""

    kind: str  # "policy" or "ppm"
    out_dir: str  # the final HF checkpoint directory
    steps: int  # optimizer steps in total (across resumes)
    final_loss: float  # the last logged training loss
    mean_loss: float  # the mean training loss over the whole run, as the trainer reports it
    losses: tuple[float, ...]  # every logged training loss, in step order (resumed runs include the earlier part)
    train_rows: int  # rows (SFT examples or PPM pairs) trained on
    wall_s: float  # seconds this call spent loading and training (up to the final save)
    resumed_from: str  # the trainer checkpoint this call resumed from; '' = started fresh
    truncated_rows: int = 0  # rows longer than max_length (SFT: cut at the end; PPM: cut at the start)
    # PPM only: fraction of held-out pairs with score(chosen) > score(rejected), from ``ppm_scores`` on the final
    # model; -1.0 when nothing was held out (heldout_fraction=0 or a single prompt group).
    pairwise_accuracy: float = -1.0
    heldout_pairs: int = 0


def init_checkpoint(cfg: TrainingConfig, base: str | Path, previous: str | Path | None) -> str | Path:
    """Where this round's training starts: the base weights, or the previous round's checkpoint when
    ``from_base`` is False and there is one (round 1 has none)."""
    return base if cfg.from_base or previous is None else previous


def use_gpu(cfg: TrainingConfig, cuda_available: bool) -> bool:
    if cfg.device == "cuda" and not cuda_available:
        raise ValueError("training.device='cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return cfg.device == "cuda" or (cfg.device == "auto" and cuda_available)


# report_to name -> the module it needs.
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(cfg: TrainingConfig, find: Callable[[str], object] | None = None) -> None:
    """Raise (naming the key and the package) when a tracker of ``training.report_to`` is not installed; run
    where training runs, before a model is loaded."""
    import importlib.util

    find = find or importlib.util.find_spec
    missing = [n for n in cfg.report_to if find(TRACKERS[n]) is None]
    if missing:
        raise ValueError(f"training.report_to={list(cfg.report_to)}: {', '.join(missing)} not installed here; "
                         f"`pip install {' '.join(TRACKERS[n] for n in missing)}` or drop it from training.report_to")


def tracking_callbacks(cfg: TrainingConfig, out_dir: Path) -> list[Any]:
    """Trainer callbacks of ``training.report_to`` that transformers' own ``report_to`` cannot place: TensorBoard
    into ``out_dir.parent / "tensorboard" / out_dir.name`` (round_N/tensorboard/policy), kept after training."""
    if "tensorboard" not in cfg.report_to:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(log_dir=str(out_dir.parent / "tensorboard" / out_dir.name)))]


def training_argument_names() -> frozenset[str]:
    """The argument names the installed transformers' ``TrainingArguments`` accepts."""
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def plain_sft_loss(cfg: TrainingConfig, cuda_available: bool) -> bool:
    """Whether the policy SFT uses transformers' own loss instead of TRL's fused LM head (``sft_loss``)."""
    return cfg.sft_loss == "plain" or (cfg.sft_loss == "auto" and not use_gpu(cfg, cuda_available))


def trainer_arguments(cfg: TrainingConfig, stage: StageConfig, work_dir: Path, *, cuda_available: bool,
                      bf16_supported: bool, cpu_bf16: bool = False,
                      arg_names: frozenset[str] | None = None) -> dict[str, Any]:
    """Keyword arguments shared by ``SFTConfig`` and ``RewardConfig`` (both ``TrainingArguments``).

    ``cpu_bf16``: precision 'auto' on CPU trains with bf16 autocast (the CPU computes bf16 natively:
    ``device_flags``; both trainers measured it). ``arg_names``: the fields of the installed
    ``TrainingArguments`` (default: read them). Each renamed
    argument is chosen on its own, because transformers renamed them in different releases: 4.x has
    ``gradient_checkpointing`` and ``warmup_ratio``; 5.17 has ``gradient_checkpointing`` and only
    ``warmup_steps`` (a float < 1 is a ratio); 5.24 adds ``activation_checkpointing``.
    """
    names = training_argument_names() if arg_names is None else arg_names
    gpu = use_gpu(cfg, cuda_available)
    if cfg.precision == "bf16" and gpu and not bf16_supported:
        raise ValueError("training.precision='bf16' but this GPU has no bf16 support; use 'fp32' or 'auto'")
    # TRL defaults bf16=True and gradient_checkpointing=True; on CPU checkpointing only slows a small model, and bf16
    # pays only where the CPU has bf16 units (bench/bench_training.py).
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (gpu and bf16_supported or not gpu and cpu_bf16))
    checkpointing = cfg.gradient_checkpointing and gpu
    renamed = {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": checkpointing,
        # without warmup_ratio, warmup_steps takes the ratio (a float < 1)
        "warmup_ratio" if "warmup_ratio" in names else "warmup_steps": stage.warmup_ratio,
    }
    return dict(
        output_dir=str(work_dir),
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps if stage.max_steps > 0 else -1,
        learning_rate=stage.lr,
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        weight_decay=stage.weight_decay,
        lr_scheduler_type=stage.lr_scheduler,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=not gpu,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,  # resuming needs the optimizer, scheduler and RNG states
        # tensorboard is a callback of ours (``tracking_callbacks``): its default directory is inside work_dir,
        # which is deleted after a successful run.
        report_to=[n for n in cfg.report_to if n != "tensorboard"] or "none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **renamed,
    )
