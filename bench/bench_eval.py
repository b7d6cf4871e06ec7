"""Evaluation's greedy chains on the embedded preset, engine variants side by side: where an eval's time goes.

    .venv/bin/python bench/bench_eval.py                                  # fp32 vs fp32:flat, 50 problems, 2 repeats
    .venv/bin/python bench/bench_eval.py --variants auto auto:flat --problems 20
    .venv/bin/python bench/bench_eval.py --variants fp32 --mode solution --samples 2 --lanes 0 64 --repeats 1

Each run is what a round's "eval greedy" does (``rounds.evaluate.run_chains``: one greedy chain per held-out
problem of ``configs/embedded.yaml``, steps executed in the sandbox) on a fresh engine, so its prefix store starts
empty as in a real evaluation. Variants are ``engines.cpu_fast_path`` values, with ':flat' for
``engines.shared_prefix_attention: false`` (every row holds the shared prefix itself). Runs alternate between the
variants; every run prints wall seconds, the engine's own clock by part (``GenStats``) and a digest of the answers,
so equal digests mean the variants answered alike (fp32 paths should; bf16 depends on what is batched together).
``--samples N`` runs N sampled chains per problem instead (maj@k's phase), ``--mode solution`` with round 0's
prompt (the bootstrap round: whole solutions), and ``--lanes 0 64`` also compares waves with chains in lanes
(``eval.chain_lanes``); engine seconds by part are summed over the lanes' calls, so wall seconds compare them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("decode_s", "prefill_s", "join_s", "retire_s", "sample_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["fp32", "fp32:flat"], help="cpu fast path[:flat]")
    ap.add_argument("--problems", type=int, default=50, help="held-out problems (the preset has 50)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
    ap.add_argument("--samples", type=int, default=0, help="sampled chains per problem (0: one greedy chain)")
    ap.add_argument("--mode", choices=("step", "solution"), default="step",
                    help="step: a trained round's prompt; solution: round 0's (the bootstrap round's)")
    ap.add_argument("--lanes", type=int, nargs="+", default=[0], help="eval.chain_lanes values (0: waves)")
    args = ap.parse_args()

    from pipeline.engines.process import prepare_process

    prepare_process()
    from data import grade, load_problems_config
    from pipeline.config import load_config
    from pipeline.engines import make_policy, with_generation
    from pipeline.sandbox import SandboxPool
    from rounds.evaluate import run_chains

    for v in args.variants:
        if v.partition(":")[2] not in ("", "flat"):
            raise SystemExit(f"--variants {v}: the only suffix is ':flat' (no shared prefix attention)")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml")
    _, held_out = load_problems_config(cfg.problems, rejected_dir=None)
    problems = held_out[: args.problems]
    greedy_gen = dataclasses.replace(cfg.engines.generation, temperature=0.0)
    what = f"{args.samples} sampled chains" if args.samples else "greedy chains"
    print(f"{len(problems)} held-out problems of configs/embedded.yaml, {what} per problem, {args.mode} mode, "
          f"max_batch_rows {cfg.engines.max_batch_rows}; each run on a fresh engine (empty prefix store)")
    print(f"{'variant':>12} {'lanes':>5} {'run':>3} {'wall s':>7} {'engine s':>8} "
          + " ".join(f"{p[:-2]:>8}" for p in PARTS) + f" {'ticks':>6} {'rows/step':>9} {'correct':>7} answers")
    with SandboxPool(cfg.sandbox) as pool:
        for rep in range(args.repeats):
            for variant in args.variants:
                for lanes in args.lanes:
                    fast, _, flat = variant.partition(":")
                    engines = dataclasses.replace(cfg.engines, cpu_fast_path=fast, shared_prefix_attention=not flat)
                    policy = make_policy(engines, model=engines.policy_model, mode=args.mode, few_shot=True,
                                         seed=cfg.seed)
                    chooser = policy if args.samples else with_generation(policy, greedy_gen)
                    t0 = time.perf_counter()
                    chains = run_chains(problems, args.samples or 1, chooser, pool, grade, cfg.search, cfg.seed, 0,
                                        "sample" if args.samples else "greedy", lanes=lanes)
                    wall = time.perf_counter() - t0
                    st = policy.stats
                    answers = hashlib.sha256(repr([[c.answer for c in cs] for cs in chains]).encode()).hexdigest()
                    parts = " ".join(f"{getattr(st, p):>8.1f}" for p in PARTS)
                    print(f"{variant:>12} {lanes:>5} {rep + 1:>3} {wall:>7.1f} {st.seconds:>8.1f} {parts} "
                          f"{st.decode_ticks:>6} {st.new_tokens / max(1, st.decode_ticks):>9.1f} "
                          f"{sum(c.correct for cs in chains for c in cs):>7} {answers[:10]}", flush=True)
                    del policy, chooser


if __name__ == "__main__":
    main()
