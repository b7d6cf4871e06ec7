"""TrainingConfig validation and the pure CPU/GPU choice of trainer arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from rounds.train_config import StageConfig, TrainingConfig, init_checkpoint, plain_sft_loss, trainer_arguments


def test_defaults_follow_rstar_math():
    cfg = TrainingConfig()
    assert (cfg.policy.epochs, cfg.policy.lr) == (2.0, 7e-6)
    assert (cfg.ppm.epochs, cfg.ppm.lr) == (1.0, 7e-6)
    assert cfg.from_base is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs=0: must be > 0"),
        ({"lr": -1.0}, "lr=-1.0: must be > 0"),
        ({"batch_size": 0}, "batch_size=0: must be >= 1"),
        ({"grad_accum": 0}, "grad_accum=0: must be >= 1"),
        ({"max_length": 0}, "max_length=0: must be >= 1"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0: must be in [0, 1)"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1: must be >= 0"),
        ({"max_steps": -1}, "max_steps=-1: must be >= 0 (0 = train for `epochs`)"),
    ],
)
def test_stage_rejects_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError) as e:
        StageConfig(**kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "kwargs, starts",
    [
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0: must be in [0, 1)"),
        ({"seed": -1}, "seed=-1: must be >= 0"),
        ({"logging_steps": 0}, "logging_steps=0: must be >= 1"),
        ({"save_steps": 0}, "save_steps=0: must be >= 1"),
        ({"save_total_limit": 1}, "save_total_limit=1: must be >= 2"),
    ],
)
def test_training_rejects_bad_values_naming_the_field(kwargs, starts):
    with pytest.raises(ValueError) as e:
        TrainingConfig(**kwargs)
    assert str(e.value).startswith(starts), str(e.value)


def test_cpu_arguments_avoid_bf16_and_checkpointing():
    cfg = TrainingConfig(gradient_checkpointing=True, policy=StageConfig(max_steps=0))
    args = trainer_arguments(cfg, cfg.policy, Path("/w"), cuda_available=False, bf16_supported=False)
    assert args["use_cpu"] is True
    assert args["bf16"] is False
    assert args["activation_checkpointing"] is False  # asked for, but only worth it on a GPU
    assert args["max_steps"] == -1  # 0 = no cap -> the Trainer's "epochs decide"
    assert args["warmup_steps"] == 0.03  # a float < 1 is a ratio in transformers 5
    assert args["output_dir"] == "/w" and args["save_only_model"] is False


def test_cpu_bf16_autocast_only_where_the_cpu_has_bf16_units_and_the_caller_measured_it():
    cfg = TrainingConfig()
    cpu = {"cuda_available": False, "bf16_supported": False}
    assert trainer_arguments(cfg, cfg.policy, Path("/w"), **cpu, cpu_bf16=True)["bf16"] is True  # policy SFT, AMX
    assert trainer_arguments(cfg, cfg.policy, Path("/w"), **cpu, cpu_bf16=False)["bf16"] is False  # no bf16 units
    assert trainer_arguments(cfg, cfg.ppm, Path("/w"), **cpu)["bf16"] is False  # the PPM does not ask (not measured)
    fp32 = TrainingConfig(precision="fp32")
    assert trainer_arguments(fp32, fp32.policy, Path("/w"), **cpu, cpu_bf16=True)["bf16"] is False  # named wins


def test_sft_loss_is_plain_on_cpu_and_trl_on_a_gpu_unless_named():
    assert plain_sft_loss(TrainingConfig(), cuda_available=False) is True
    assert plain_sft_loss(TrainingConfig(), cuda_available=True) is False
    assert plain_sft_loss(TrainingConfig(device="cpu"), cuda_available=True) is True  # training on the CPU anyway
    assert plain_sft_loss(TrainingConfig(sft_loss="trl"), cuda_available=False) is False
    assert plain_sft_loss(TrainingConfig(sft_loss="plain"), cuda_available=True) is True
    with pytest.raises(ValueError, match="sft_loss='fused'"):
        TrainingConfig(sft_loss="fused")  # type: ignore[arg-type]


def test_gpu_arguments_use_bf16_and_configured_checkpointing():
    cfg = TrainingConfig(gradient_checkpointing=True, ppm=StageConfig(max_steps=7))
    args = trainer_arguments(cfg, cfg.ppm, Path("/w"), cuda_available=True, bf16_supported=True)
    assert (args["use_cpu"], args["bf16"], args["activation_checkpointing"]) == (False, True, True)
    assert args["max_steps"] == 7
    fp32 = trainer_arguments(TrainingConfig(precision="fp32"), cfg.ppm, Path("/w"), cuda_available=True,
                             bf16_supported=True)
    assert fp32["bf16"] is False


def test_device_and_precision_errors_say_what_to_do():
    with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU"):
        trainer_arguments(TrainingConfig(device="cuda"), StageConfig(), Path("/w"), cuda_available=False,
                          bf16_supported=False)
    with pytest.raises(ValueError, match="precision='bf16' but this GPU has no bf16"):
        trainer_arguments(TrainingConfig(precision="bf16"), StageConfig(), Path("/w"), cuda_available=True,
                          bf16_supported=False)


def test_each_renamed_argument_follows_the_installed_transformers():
    def args(names):
        return trainer_arguments(TrainingConfig(), StageConfig(warmup_ratio=0.1), Path("/w"), cuda_available=False,
                                 bf16_supported=False, arg_names=frozenset(names))

    v4 = args({"gradient_checkpointing", "warmup_ratio", "warmup_steps"})
    assert v4["warmup_ratio"] == 0.1 and v4["gradient_checkpointing"] is False
    assert "warmup_steps" not in v4 and "activation_checkpointing" not in v4
    # transformers 5.17 (the GPU check's machine): warmup_ratio gone, activation_checkpointing not there yet
    v517 = args({"gradient_checkpointing", "warmup_steps"})
    assert v517["warmup_steps"] == 0.1 and v517["gradient_checkpointing"] is False
    assert "warmup_ratio" not in v517 and "activation_checkpointing" not in v517
    v524 = args({"gradient_checkpointing", "activation_checkpointing", "warmup_steps"})
    assert v524["warmup_steps"] == 0.1 and v524["activation_checkpointing"] is False and "gradient_checkpointing" not in v524
    # the installed transformers accepts every name chosen for it
    from transformers import TrainingArguments

    installed = trainer_arguments(TrainingConfig(), StageConfig(), Path("/w"), cuda_available=False, bf16_supported=False)
    TrainingArguments(**installed)


def test_arguments_build_real_trl_configs():
    from trl import RewardConfig, SFTConfig

    cfg = TrainingConfig()
    kwargs = trainer_arguments(cfg, cfg.policy, Path("/tmp/unused"), cuda_available=False, bf16_supported=False)
    sft = SFTConfig(**kwargs, completion_only_loss=True)
    reward = RewardConfig(**kwargs)
    # TRL's own defaults (bf16, gradient checkpointing on) must not leak through on CPU.
    for args in (sft, reward):
        assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
        assert args.learning_rate == 7e-6 and args.seed == 0


def test_init_checkpoint_from_base_or_previous():
    assert init_checkpoint(TrainingConfig(from_base=True), "base", "r1/policy") == "base"
    assert init_checkpoint(TrainingConfig(from_base=False), "base", "r1/policy") == "r1/policy"
    assert init_checkpoint(TrainingConfig(from_base=False), "base", None) == "base"  # round 1 has no previous


def test_report_to_is_off_by_default_and_names_what_is_missing():
    from rounds.train_config import check_trackers, tracking_callbacks

    off = trainer_arguments(TrainingConfig(), StageConfig(), Path("/w"), cuda_available=False, bf16_supported=False)
    assert off["report_to"] == "none" and tracking_callbacks(TrainingConfig(), Path("/w/policy")) == []
    cfg = TrainingConfig(report_to=("tensorboard", "wandb"))
    on = trainer_arguments(cfg, StageConfig(), Path("/w"), cuda_available=False, bf16_supported=False)
    # wandb goes to transformers as is; tensorboard is our callback (its default directory is the work dir,
    # which is deleted after training)
    assert on["report_to"] == ["wandb"]
    with pytest.raises(ValueError, match=r"training.report_to=\['tensorboard', 'wandb'\]: wandb not installed here; "
                                         r"`pip install wandb`"):
        check_trackers(cfg, find=lambda name: None if name == "wandb" else object())
    check_trackers(cfg, find=lambda name: object())  # both there: fine
    with pytest.raises(ValueError, match="report_to=\\['tensorbord'\\]: 'tensorbord' is not one of"):
        TrainingConfig(report_to=("tensorbord",))


def test_report_to_from_the_run_config():
    from pipeline.config import ConfigError, load_config

    assert load_config(None, ["training.report_to=[wandb]"]).training.report_to == ("wandb",)
    with pytest.raises(ConfigError, match="training.report_to"):
        load_config(None, ["training.report_to=[neptune]"])
