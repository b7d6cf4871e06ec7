"""Generation throughput of the transformers backend on the embedded model, against the machine's matmul roofline.

    .venv/bin/python bench/bench_generation.py                         # batches 1 8 32 64, fp32 and the probe's pick
    .venv/bin/python bench/bench_generation.py --batches 1 8 --paths fp32 bf16 int8 --new-tokens 16
    .venv/bin/python bench/bench_generation.py --paths fp32 fp32:flat     # cascade prefix attention on vs off

A batch of B rows is B/k distinct few-shot prompts x k samples each (k = min(B, 8): one MCTS expansion asks
for 5-8 children), i.e. what one search wave sends. Throughput = sampled tokens / wall seconds of the whole
call, prefill included (the engine's shared instruction+examples prefix is computed before timing: it is
computed once per engine lifetime).

Roofline: the model's decode cost is 2 FLOPs per weight of its linear layers (lm_head included) per token,
so achieved FLOP/s = tok/s x that; the roofline ratio divides it by the machine's fp32 matmul FLOP/s
(a 1024^3 fp32 matmul, best of several), measured in this same run, before and after the engines, best
kept. The machine is shared: absolute numbers swing with load, the ratios in one run are what to compare.

Fast paths (``--paths``): each is its own engine on the same model, run side by side, alternating, best of
``--repeats``. 'auto' is what the engine's start-up probe picks. Each path's greedy outputs on a fixed
prompt set are compared with fp32's: 'greedy=fp32' counts the prompts whose text is identical. A path with
':flat' (e.g. 'fp32:flat') turns ``engines.shared_prefix_attention`` off: every row holds the shared prefix's KV
and attends to it itself (pipeline/engines/cascade.py), the engine as it was before 2026-12-01.
"""

from __future__ import annotations

import argparse
import time


def _states(n: int, seed0: int = 0):
    from mcts.protocols import SearchState

    return [SearchState(f"p{i}", f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples does he have?",
                        "", seed0 + i) for i in range(n)]


def matmul_flops(dtype_name: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype_name`` on this CPU (best of ``repeats``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="rows per call")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per row")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per batch size; the best is kept")
    ap.add_argument("--paths", nargs="+", default=["fp32", "auto"],
                    help="cpu fast paths to compare (fp32 first); ':flat' = without shared prefix attention")
    ap.add_argument("--agree-prompts", type=int, default=6, help="prompts of the greedy agreement check")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = ap.parse_args()

    import torch

    from pipeline.engines import EngineConfig, GenerationConfig, make_policy, with_generation

    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=args.new_tokens)
    policies = {}
    for path in dict.fromkeys(args.paths):
        fast, _, variant = path.partition(":")
        if variant not in ("", "flat"):
            raise SystemExit(f"--paths {path}: the only variant is ':flat' (no shared prefix attention)")
        cfg = EngineConfig(device="cpu", max_batch_rows=max(args.batches), generation=gen, cpu_fast_path=fast,
                           cpu_threads=args.threads, shared_prefix_attention=variant != "flat")
        policies[path] = pol = make_policy(cfg, mode="step", few_shot=True)
        pol.propose(_states(1), 1)  # computes the shared prefix once, as a long-lived engine would
        if fast == "auto":
            print(f"auto: {pol.probe.summary()}")
    first = next(iter(policies.values()))
    ftok = first.flops_per_token
    peak = matmul_flops("float32")
    peak_bf16 = matmul_flops("bfloat16")
    prompt_len = len(first.tokenizer(first.builder.build(_states(1)[0].question))["input_ids"])
    print(f"embedded SmolLM2-135M, CPU, torch threads={torch.get_num_threads()}, prompt ~{prompt_len} tokens, "
          f"<= {args.new_tokens} new tokens per row, step mode; machine shared with other work (load varies)")

    print(f"{'batch':>5} {'prompts x k':>11} " + " ".join(f"{p + ' tok/s':>11} {'roofline':>8}" for p in policies))
    for batch in args.batches:
        k = min(batch, 8)
        states = _states(max(1, batch // k))
        best = dict.fromkeys(policies, 0.0)
        for _ in range(args.repeats):
            for path, pol in policies.items():
                before = pol.stats.new_tokens
                t0 = time.perf_counter()
                pol.propose(states, k)
                best[path] = max(best[path], (pol.stats.new_tokens - before) / (time.perf_counter() - t0))
        peak = max(peak, matmul_flops("float32", repeats=2))
        cells = " ".join(f"{best[p]:>11.1f} {best[p] * ftok / peak:>8.1%}" for p in policies)
        print(f"{batch:>5} {f'{len(states)} x {k}':>11} {cells}", flush=True)
    print(f"roofline = tok/s x {ftok / 1e6:.0f} MFLOP/token / fp32 matmul {peak / 1e9:.0f} GFLOP/s "
          f"(bf16 matmul {peak_bf16 / 1e9:.0f} GFLOP/s), measured in this run")

    greedy = GenerationConfig(temperature=0.0, max_new_tokens_step=args.new_tokens)
    states = _states(args.agree_prompts, seed0=100)
    ref = None
    for path, pol in policies.items():
        texts = [p[0].text for p in with_generation(pol, greedy).propose(states, 1)]
        if ref is None:
            ref = texts
        same = sum(a == b for a, b in zip(texts, ref, strict=True))
        print(f"greedy={path}: {same}/{len(states)} prompts give fp32's exact text ({args.new_tokens} tokens)")


if __name__ == "__main__":
    main()
