"""The two training phases of a round: policy SFT on the pooled correct trajectories, then the PPM from it.

Training runs where the accelerators are (``pipeline.context.on_accelerators``). The policy trains first: under
``training.ppm_init="policy"`` the round's PPM starts from the round's fine-tuned policy (rStar-Math). A round
whose SFT rows did not change since an earlier round (no new correct trajectory) reuses that round's policy when
training starts from the base weights: same rows, same seed, same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.context import RoundContext, on_accelerators, parquet_rows, prompt_builder
from rounds.schedule import policy_settings


def phase_train_policy(ctx: RoundContext) -> dict:
    from rounds.train_config import init_checkpoint
    from rounds.train_policy import train_policy

    if not ctx.spec.train_policy:
        return {"skipped": "train_policy is false for this round"}
    sft, data = policy_sft_data(ctx)
    n = data["rows"]
    if n == 0:
        ctx.log.warning("policy_not_trained", round=ctx.round_no,
                        reason="no correct trajectory was found, so there is no SFT data; the next round "
                               "keeps the current policy")
        return {"skipped": "0 SFT rows", "data": data}
    same = same_data_round(ctx, data["digest"])
    if same is not None and ctx.cfg.training.from_base:
        # From the base weights on the same rows with the same seed: the same model as round `same`'s.
        ctx.log.info("policy_not_retrained", round=ctx.round_no, same_as_round=same,
                     reason="the SFT pool is unchanged since that round (no new correct trajectory)")
        what = "pooled SFT data" if ctx.cfg.training.policy_pool else "SFT data"
        return {"skipped": f"{what} unchanged since round {same}", "same_as_round": same, "data": data}
    init = init_checkpoint(ctx.cfg.training, ctx.cfg.engines.policy_model, ctx.lineage.newest_policy(ctx.round_no - 1))
    out = ctx.run.policy_dir(ctx.round_no)
    with _step_bar(ctx, "train policy") as callbacks:
        result = on_accelerators(ctx.cfg, ctx.run, train_policy, init, sft, out, ctx.cfg.training, callbacks=callbacks,
                                 writes=out, compute_thread=True)
    ctx.log.info("policy_trained", round=ctx.round_no, loss=result.final_loss, steps=result.steps, rows=n,
                 problems=data["problems"], pooled=ctx.cfg.training.policy_pool)
    # out_dir as this driver sees it (a task on another node wrote the checkpoint into its own node cache first)
    return dataclasses.asdict(result) | {"out_dir": str(out), "data": data}


def phase_train_ppm(ctx: RoundContext) -> dict:
    from rounds.train_config import init_checkpoint
    from rounds.train_ppm import train_ppm

    if not ctx.spec.train_ppm:
        return {"skipped": "train_ppm is false for this round"}
    pairs = ctx.run.export_path(ctx.round_no, "ppm_pairs")
    n = parquet_rows(pairs)
    if n < 2:
        ctx.log.warning("ppm_not_trained", round=ctx.round_no, pairs=n,
                        reason="fewer than 2 preference pairs: the search found no node with both a correct "
                               "and a wrong continuation")
        return {"skipped": f"{n} preference pairs"}
    # Runs after phase_train_policy, so under ppm_init="policy" the backbone is this round's fine-tuned policy.
    init = init_checkpoint(ctx.cfg.training, ctx.lineage.ppm_backbone(ctx.round_no), ctx.lineage.newest_ppm(ctx.round_no - 1))
    out = ctx.run.ppm_dir(ctx.round_no)
    with _step_bar(ctx, "train ppm") as callbacks:
        result = on_accelerators(ctx.cfg, ctx.run, train_ppm, init, pairs, out, ctx.cfg.training, callbacks=callbacks,
                                 writes=out, compute_thread=True)
    ctx.log.info("ppm_trained", round=ctx.round_no, loss=result.final_loss, steps=result.steps,
                 heldout_accuracy=result.pairwise_accuracy, heldout_pairs=result.heldout_pairs)
    return dataclasses.asdict(result) | {"out_dir": str(out)}


def policy_sft_data(ctx: RoundContext) -> tuple[Path, dict]:
    """round_N/sft_train.parquet: what the round's policy trains on (``rounds.sft_pool``): the best correct
    trajectories of every problem over rounds 1..N (``training.policy_pool``) or this round's only, with
    prompts as the trained policy will be searched with (``training.sft_prompt``)."""
    from rounds.sft_pool import build_sft_data

    t = ctx.cfg.training
    first = 1 if t.policy_pool else ctx.round_no
    paths = [ctx.run.export_path(r, "sft") for r in range(first, ctx.round_no + 1)]
    few_shot = policy_settings(ctx.cfg.rounds.schedule, trained=True)[1] if t.sft_prompt == "search" else False
    out = ctx.dir / "sft_train.parquet"
    top_n = max(1, ctx.cfg.search.extract.sft_top_n)
    return out, build_sft_data(paths, out, top_n, prompt_builder(ctx.cfg, few_shot).build)


def same_data_round(ctx: RoundContext, digest: str) -> int | None:
    """The latest earlier round whose policy trained on exactly these rows, if its checkpoint exists."""
    for r in range(ctx.round_no - 1, 0, -1):
        info = (ctx.run.marker(r, "train_policy") or {}).get("info", {})
        trained = (ctx.run.policy_dir(r) / "config.json").is_file()
        if (info.get("data") or {}).get("digest") == digest:
            return r if trained else info.get("same_as_round")
        if trained:
            return None  # a policy on other data was trained since
    return None


@contextlib.contextmanager
def _step_bar(ctx: RoundContext, what: str) -> Iterator[list[Any]]:
    """The trainer callbacks that drive a console step bar with the last loss (none when the round has no
    console, or training runs as a Ray task: the console lives in this process)."""
    if ctx.console is None or ctx.cfg.ray.gpus_per_engine:
        yield []
        return
    bar = ctx.console.bar(f"round {ctx.round_no} {what}", None, unit="step")
    try:
        yield [bar_callback(bar)]
    finally:
        bar.close(line=False)  # the phase's summary line follows (pipeline.driver.run_round)


def bar_callback(bar: Any) -> Any:
    """A transformers ``TrainerCallback`` that moves ``bar`` (``pipeline.console.Bar``) one step per optimizer
    step and shows each logged loss."""
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            bar.set_total(state.max_steps or None, done=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                bar.update(0, loss=float(logs["loss"]))

    return StepBar()


__all__ = ["bar_callback", "phase_train_policy", "phase_train_ppm", "policy_sft_data", "same_data_round"]
