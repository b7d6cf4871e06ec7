"""Evaluation's greedy chains on the embedded preset, engine variants side by side: where an eval's time goes.

    .venv/bin/python bench/bench_eval.py                                  # fp32 vs fp32:flat, 50 problems, 2 repeats
    .venv/bin/python bench/bench_eval.py --variants auto auto:flat --problems 20

Each run is what a round's "eval greedy" does (``rounds.evaluate.run_chains``: one greedy chain per held-out
problem of ``configs/embedded.yaml``, steps executed in the sandbox) on a fresh engine, so its prefix store starts
empty as in a real evaluation. Variants are ``engines.cpu_fast_path`` values, with ':flat' for
``engines.shared_prefix_attention: false`` (every row holds the shared prefix itself). Runs alternate between the
variants; every run prints wall seconds, the engine's own clock by part (``GenStats``) and a digest of the answers,
so equal digests mean the variants answered alike (fp32 paths should; bf16 depends on what is batched together).
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
    print(f"{len(problems)} held-out problems of configs/embedded.yaml, greedy chains, max_batch_rows "
          f"{cfg.engines.max_batch_rows}; each run on a fresh engine (empty prefix store)")
    print(f"{'variant':>12} {'run':>3} {'wall s':>7} {'engine s':>8} " + " ".join(f"{p[:-2]:>8}" for p in PARTS)
          + f" {'rows/step':>9} {'correct':>7} answers")
    with SandboxPool(cfg.sandbox) as pool:
        for rep in range(args.repeats):
            for variant in args.variants:
                fast, _, flat = variant.partition(":")
                engines = dataclasses.replace(cfg.engines, cpu_fast_path=fast, shared_prefix_attention=not flat)
                policy = make_policy(engines, model=engines.policy_model, mode="step", few_shot=True, seed=cfg.seed)
                greedy = with_generation(policy, greedy_gen)
                t0 = time.perf_counter()
                chains = run_chains(problems, 1, greedy, pool, grade, cfg.search, cfg.seed, 0, "greedy")
                wall = time.perf_counter() - t0
                st = policy.stats
                answers = hashlib.sha256(repr([c[0].answer for c in chains]).encode()).hexdigest()[:10]
                parts = " ".join(f"{getattr(st, p):>8.1f}" for p in PARTS)
                print(f"{variant:>12} {rep + 1:>3} {wall:>7.1f} {st.seconds:>8.1f} {parts} "
                      f"{st.new_tokens / max(1, st.decode_ticks):>9.1f} {sum(c[0].correct for c in chains):>7} "
                      f"{answers}", flush=True)
                del policy, greedy


if __name__ == "__main__":
    main()
