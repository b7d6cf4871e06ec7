"""Policy SFT speed on CPU: the embedded preset's real training run under cheaper settings, side by side.

    .venv/bin/python bench/bench_training.py                            # every variant, 2 alternating repeats
    .venv/bin/python bench/bench_training.py --variants fp32 bf16 --repeats 1 --steps 10

What is trained is what ``make run``'s policy SFT trains (``rounds.train_policy.build_sft_trainer`` with the
preset's ``training`` section: SmolLM2-135M, max_steps, batch size, max_length and lr unchanged): prompts are the
search prompt with the preset's two worked examples (``training.sft_prompt: search``), completions are correct
step-format solutions of the preset's arithmetic problems (two per problem, as the pool's top 2: one step with
the expression, or a named intermediate first), 2 x ``--problems`` rows.

Variants (each a change to the preset's CPU settings):

- ``fp32``: the current CPU defaults (fp32, no gradient checkpointing, AdamW (torch), dataloader in-process);
- ``bf16``: ``training.precision: bf16`` - bf16 autocast (accelerate's ``mixed_precision``) with fp32 weights and
  optimizer state, so the update is the fp32 update of a bf16 forward/backward;
- ``fused``: fp32 with ``optim: adamw_torch_fused``;
- ``plain`` / ``bf16-plain``: transformers' own causal-LM loss instead of TRL's fused head, fp32 / bf16;
- ``shared``: ``bf16-plain`` with the batch's common prompt prefix computed once (``training.shared_prefix``, the
  CPU default since 2026-12-01: ``rounds.shared_prefix``);
- ``padfree``: bf16 and TRL's ``padding_free`` (rows concatenated, no pad tokens; transformers builds the
  block-diagonal mask from position_ids).

Variants alternate within each repeat, so a change of the machine's load touches all of them. Per variant: the
seconds of ``trainer.train()`` (model load and save excluded; best of the repeats), the ratio to ``fp32``, the
last logged training loss and the mean, and an fp32 loss of the trained model on the training rows (one
forward, the same measure for every variant). The load average is printed before and after: the machine is
shared, compare variants of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "fp32": {"precision": "fp32", "sft_loss": "trl"},
    "bf16": {"precision": "bf16", "sft_loss": "trl"},
    "plain": {"precision": "fp32", "sft_loss": "plain", "shared_prefix": False},
    "bf16-plain": {"precision": "bf16", "sft_loss": "plain", "shared_prefix": False},
    "shared": {"precision": "bf16", "sft_loss": "plain", "shared_prefix": True},
    "fused": {"precision": "fp32", "sft_loss": "trl", "optim": "adamw_torch_fused"},
    "padfree": {"precision": "bf16", "sft_loss": "trl", "padding_free": True},
}


def sft_rows(cfg, n: int) -> dict[str, list[str]]:
    """Two correct step-format solutions per problem, on the search prompt (module doc)."""
    from data.expression import evaluate
    from data.loaders import load_problems_config
    from mcts.steps import render_steps
    from pipeline.context import prompt_builder
    from rounds.schedule import policy_settings

    few_shot = policy_settings(cfg.rounds.schedule, trained=True)[1]
    builder = prompt_builder(cfg, few_shot)
    problems = load_problems_config(dataclasses.replace(cfg.problems, n=n))[0]
    rows: dict[str, list[str]] = {"prompt": [], "completion": []}
    for p in problems:
        expr = p.meta["expression"]
        value = evaluate(expr)
        shown = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        one = [(f"# Compute the whole story in one expression.\nresult = {expr}\nprint(result)", shown, False),
               (f"# The answer is \\boxed{{{p.answer}}}", "", True)]
        two = [(f"# Work out the amount step by step.\nvalue = {expr}\nprint(value)", shown, False),
               (f"# So the final amount is {p.answer}.\n# The answer is \\boxed{{{p.answer}}}", "", True)]
        for steps in (one, two):
            rows["prompt"].append(builder.build(p.question))
            rows["completion"].append(render_steps(steps))
    return rows


def fp32_loss(model, tok, rows: dict[str, list[str]], max_length: int) -> float:
    """Mean completion-token cross entropy of ``model`` (cast to fp32) over ``rows``, one row at a time."""
    import torch

    model = model.float().eval()
    total = count = 0.0
    with torch.inference_mode():
        for prompt, completion in zip(rows["prompt"], rows["completion"], strict=True):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + c)[:max_length]
            labels = torch.tensor([[-100] * len(p) + c][0][:max_length]).unsqueeze(0)
            out = model(input_ids=torch.tensor([ids]), labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def _clock():
    """A trainer callback: when each optimizer step ended, and the seconds spent in checkpoint saves."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.save_s = 0.0
            self._t = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self._t = time.perf_counter()

        def on_save(self, args, state, control, **kw):
            self.save_s += time.perf_counter() - self._t

        def step_s(self) -> float:
            """Median seconds of one optimizer step (forward, backward, update; saves excluded)."""
            gaps = sorted(b - a for a, b in zip(self.ends, self.ends[1:], strict=False))
            return gaps[len(gaps) // 2] if gaps else 0.0

    return Clock()


def run_variant(name: str, cfg, rows, steps: int, work: Path) -> dict:
    from rounds.train_policy import build_sft_trainer

    over = dict(VARIANTS[name])
    optim = over.pop("optim", None)
    padding_free = over.pop("padding_free", False)
    stage = dataclasses.replace(cfg.training.policy, max_steps=steps)
    trainer, _ = build_sft_trainer("embedded:smollm2-135m", rows, work / name,
                                   dataclasses.replace(cfg.training, policy=stage, **over))
    if optim:
        trainer.args.optim = optim  # read when train() creates the optimizer
    if padding_free:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id,
                                                                padding_free=True)
    clock = _clock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "step" in e]
    return {"s": seconds, "steps": trainer.state.global_step, "step_s": clock.step_s(), "save_s": clock.save_s, "final": losses[-1], "first": losses[0],
            "mean": float(out.training_loss),
            "fp32": fp32_loss(trainer.model, trainer.processing_class, rows, stage.max_length)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the preset's max_steps)")
    ap.add_argument("--problems", type=int, default=10, help="problems; 2 SFT rows each")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core of this process)")
    args = ap.parse_args()

    import torch

    from pipeline.config import load_config

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    cfg = load_config(args.config)
    steps = args.steps or cfg.training.policy.max_steps
    rows = sft_rows(cfg, args.problems)
    print(f"{len(rows['prompt'])} rows, {steps} steps x batch {cfg.training.policy.batch_size}, lr "
          f"{cfg.training.policy.lr}, max_length {cfg.training.policy.max_length}, {torch.get_num_threads()} threads; "
          f"load average before: {os.getloadavg()}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench_training.") as tmp:
        for r in range(args.repeats):
            for v in args.variants:
                res = run_variant(v, cfg, rows, steps, Path(tmp) / f"r{r}")
                results[v].append(res)
                print(f"  repeat {r} {v:<11} {res['s']:6.1f} s  median step {res['step_s']:.2f} s  end-of-training "
                      f"checkpoint {res['save_s']:.1f} s  loss first {res['first']:.3f} final {res['final']:.3f}"
                      f"  fp32 loss after {res['fp32']:.4f}  (load {os.getloadavg()[0]:.2f})", flush=True)
    base = min(x["s"] for x in results.get("fp32", [])) if "fp32" in results else None
    print(f"load average after: {os.getloadavg()}")
    base_step = min(x["step_s"] for x in results["fp32"]) if "fp32" in results else None
    print(f"{'variant':<11} {'best s':>7} {'speed-up':>8} {'step s':>7} {'speed-up':>8} {'final loss':>13} "
          f"{'mean loss':>13} {'fp32 loss after':>15}")
    for v, rs in results.items():
        best = min(x["s"] for x in rs)
        step = min(x["step_s"] for x in rs)
        ratio = f"{base / best:.2f}x" if base else "-"
        ratio_step = f"{base_step / step:.2f}x" if base_step else "-"
        final = "/".join(f"{x['final']:.3f}" for x in rs)
        mean = "/".join(f"{x['mean']:.3f}" for x in rs)
        after = "/".join(f"{x['fp32']:.4f}" for x in rs)
        print(f"{v:<11} {best:>7.1f} {ratio:>8} {step:>7.2f} {ratio_step:>8} {final:>13} {mean:>13} {after:>15}")


if __name__ == "__main__":
    main()
