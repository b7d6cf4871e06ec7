"""Generation throughput of the transformers backend on the embedded model, against the machine's matmul roofline.

    .venv/bin/python bench/bench_generation.py                         # batches 1 8 32 64, fp32 and the probe's pick
    .venv/bin/python bench/bench_generation.py --batches 1 8 --paths fp32 bf16 int8 --new-tokens 16
    .venv/bin/python bench/bench_generation.py --paths fp32 fp32:flat     # cascade prefix attention on vs off
    .venv/bin/python bench/bench_generation.py --paths fp32 --hf-generate-batch  # vs transformers' generate_batch
    .venv/bin/python bench/bench_generation.py --batches 64 --paths auto --history-steps 0 6  # a rollout's contexts
    .venv/bin/python bench/bench_generation.py --batches 64 --paths auto auto:group --history-steps 0 6  # group attention

A batch of B rows is B/k distinct few-shot prompts x k samples each (k = min(B, 8): one MCTS expansion asks
for 5-8 children), i.e. what one search wave sends. Throughput = sampled tokens / wall seconds of the whole
call, prefill included (the engine's shared instruction+examples prefix is computed before timing: it is
computed once per engine lifetime). ``--history-steps N`` gives every prompt N executed steps of history, as a
node N deep in a tree has: rows then attend to ~40 more tokens of their own per step (a rollout's rows carry
question + history + generated text, the reference call only a question).

Roofline: the model's decode cost is 2 FLOPs per weight of its linear layers (lm_head included) per token,
so achieved FLOP/s = tok/s x that; the roofline ratio divides it by the machine's fp32 matmul FLOP/s
(a 1024^3 fp32 matmul, best of several), measured in this same run, before and after the engines, best
kept. The machine is shared: absolute numbers swing with load, the ratios in one run are what to compare.

Fast paths (``--paths``): each is its own engine on the same model, run side by side, alternating, best of
``--repeats``. 'auto' is what the engine's start-up probe picks. Each path's greedy outputs on a fixed
prompt set are compared with fp32's: 'greedy=fp32' counts the prompts whose text is identical. A path with
':flat' (e.g. 'fp32:flat') turns ``engines.shared_prefix_attention`` off: every row holds the shared prefix's KV
and attends to it itself (pipeline/engines/cascade.py), the engine as it was before 2026-12-01. ':group' (e.g.
'auto:group') turns ``engines.group_attention`` on: a request's sample rows attend to one copy of their prompt's
KV (question + history) instead of each holding one. ':plain' (e.g. 'bf16:plain') keeps torch's plain bf16
``Linear`` layers, which reorder their weights for oneDNN on every call (``engines.packed_linears`` false;
pipeline/engines/packed.py). ':eager' (e.g. 'auto:eager') keeps transformers' own RMSNorm, residual adds and RoPE
instead of the fused C kernels (``engines.fused_kernels`` false; pipeline/engines/fused.py); ':flash' keeps the
fused norms and RoPE but torch's flash attention for each row's own cache (``engines.fused_attention`` false).

``--hf-generate-batch`` also times transformers' own continuous batching (``model.generate_batch``: paged KV
cache, its scheduler and sampler) on the same prompts, k, sampling settings and new-token budget, with a
second copy of the model in the first path's dtype under sdpa attention (it refuses the engine's cascade
attention), side by side with the engines. It has no stop strings, so its rows run to the budget or EOS:
compare tokens/s, not texts.
"""

from __future__ import annotations

import argparse
import time


def _states(n: int, seed0: int = 0, history_steps: int = 0):
    from mcts.protocols import SearchState
    from mcts.steps import render_steps

    def history(i: int) -> str:
        steps, total = [], i + 3
        for j in range(history_steps):
            total += j + 2
            steps.append((f"# Step {j + 1}: he buys {j + 2} more apples, so the running total grows.\n"
                          f"total = total + {j + 2}\nprint(total)", str(total), False))
        return render_steps(steps)

    return [SearchState(f"p{i}", f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples does he have?",
                        history(i), seed0 + i) for i in range(n)]


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


def engine_runner(pol):
    """A function (states, k, seed) -> tokens the engine ``pol`` generated for ``k`` samples of each state; its
    ``rows_per_step`` is the last call's rows per decode step: tokens sampled after each row's first (which comes
    from its prompt's forward) over decode forwards. Rows stop at different lengths, so a call of 64 rows decodes
    fewer than 64 a step on average."""

    def run(states, k: int, seed: int) -> int:
        before, ticks = pol.stats.new_tokens, pol.stats.decode_ticks
        pol.propose(states, k)  # the states carry their own seeds
        rows = len(states) * k
        run.rows_per_step = (pol.stats.new_tokens - before - rows) / max(1, pol.stats.decode_ticks - ticks)
        return pol.stats.new_tokens - before

    return run


def hf_generate_batch(pol, model_path, new_tokens: int, gen):
    """A function (states, k, seed) -> tokens generated by transformers' ``generate_batch`` for ``k`` samples
    of each state's prompt (tokenized as ``pol`` does), on an sdpa copy of ``model_path`` in ``pol``'s dtype."""
    import math

    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from pipeline.engines import compute

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=pol.model.dtype,
                                                 attn_implementation="sdpa").eval()
    tok = pol.tokenizer
    page = 64

    def run(states, k: int, seed: int) -> int:
        ids = [tok(pol.builder.build(s.question), add_special_tokens=False)["input_ids"] for s in states]
        hf_gen = HFGenerationConfig(do_sample=True, temperature=gen.temperature, top_p=gen.top_p,
                                    max_new_tokens=new_tokens, num_return_sequences=k,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        # The paged cache sized to hold every row whole (its default sizes itself from GPU memory).
        blocks = len(ids) * k * math.ceil((max(map(len, ids)) + new_tokens) / page) + 8
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=4096,
                                      max_requests_per_batch=len(ids) * k, seed=seed)
        out = compute.run(model.generate_batch, ids, generation_config=hf_gen, continuous_batching_config=cb,
                          warmup=False)
        if len(out) != len(ids) * k:
            raise RuntimeError(f"generate_batch returned {len(out)} of {len(ids) * k} requests")
        return sum(len(o.generated_tokens) for o in out.values())

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="rows per call")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per row")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per batch size; the best is kept")
    ap.add_argument("--paths", nargs="+", default=["fp32", "auto"],
                    help="cpu fast paths to compare (fp32 first); ':flat' = without shared prefix attention, "
                         "':group' = with group attention, ':plain' = bf16 linear layers not packed, ':eager' = "
                         "transformers' own norms and RoPE (no fused kernels), ':flash' = fused kernels with flash "
                         "attention")
    ap.add_argument("--agree-prompts", type=int, default=6, help="prompts of the greedy agreement check")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--history-steps", type=int, nargs="+", default=[0],
                    help="executed steps of history in every prompt (a node that deep in a tree); several: side by side")
    ap.add_argument("--hf-generate-batch", action="store_true",
                    help="also time transformers' generate_batch (continuous batching, paged cache) side by side")
    args = ap.parse_args()

    import torch

    from pipeline.engines import EngineConfig, GenerationConfig, compute, make_policy, with_generation

    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=args.new_tokens)
    policies = {}
    for path in dict.fromkeys(args.paths):
        fast, _, variant = path.partition(":")
        if variant not in ("", "flat", "group", "plain", "eager", "flash"):
            raise SystemExit(f"--paths {path}: variants are ':flat' (no shared prefix attention), ':group' "
                             f"(group attention), ':plain' (bf16 linear layers not packed), ':eager' "
                             f"(no fused kernels) and ':flash' (fused kernels, flash attention)")
        cfg = EngineConfig(device="cpu", max_batch_rows=max(args.batches), generation=gen, cpu_fast_path=fast,
                           cpu_threads=args.threads, shared_prefix_attention=variant != "flat",
                           group_attention=variant == "group", packed_linears=variant != "plain",
                           fused_kernels=variant != "eager", fused_attention=variant != "flash")
        policies[path] = pol = make_policy(cfg, mode="step", few_shot=True)
        pol.propose(_states(1), 1)  # computes the shared prefix once, as a long-lived engine would
        if fast == "auto":
            print(f"auto: {pol.probe.summary()}")
    first = next(iter(policies.values()))
    ftok = first.flops_per_token
    runners = {path: engine_runner(pol) for path, pol in policies.items()}
    if args.hf_generate_batch:
        from rounds.models import resolve_model

        runners[f"generate_batch:{first.model.dtype}".replace("torch.", "")] = hf_generate_batch(
            first, resolve_model(EngineConfig().policy_model), args.new_tokens, gen)
    # On the engines' compute thread: a matmul on the main thread would leave an OpenMP team there that slows every
    # engine of this process 1.4-1.7x (pipeline/engines/compute.py).
    peak = compute.run(matmul_flops, "float32")
    peak_bf16 = compute.run(matmul_flops, "bfloat16")
    prompt_len = len(first.tokenizer(first.builder.build(_states(1)[0].question))["input_ids"])
    print(f"embedded SmolLM2-135M, CPU, torch threads={torch.get_num_threads()}, prompt ~{prompt_len} tokens, "
          f"<= {args.new_tokens} new tokens per row, step mode; machine shared with other work (load varies)")

    print(f"{'batch':>5} {'prompts x k':>11} {'history':>9} "
          + " ".join(f"{p + ' tok/s':>11} {'roofline':>8}" for p in runners))
    for batch in args.batches:
        k = min(batch, 8)
        cases = {h: _states(max(1, batch // k), history_steps=h) for h in args.history_steps}
        best = {(h, path): 0.0 for h in cases for path in runners}
        rows = {}  # (history, path) -> the best call's rows per decode step (engines only)
        for rep in range(args.repeats):
            for h, states in cases.items():
                for path, run in runners.items():
                    t0 = time.perf_counter()
                    new = run(states, k, rep)
                    rate = new / (time.perf_counter() - t0)
                    if rate > best[h, path]:
                        best[h, path] = rate
                        if hasattr(run, "rows_per_step"):
                            rows[h, path] = run.rows_per_step
        peak = max(peak, compute.run(matmul_flops, "float32", repeats=2))
        for h, states in cases.items():
            own = len(first.tokenizer(first.builder.build(states[0].question, states[0].history))["input_ids"])
            cells = " ".join(f"{best[h, p]:>11.1f} {best[h, p] * ftok / peak:>8.1%}" for p in runners)
            print(f"{batch:>5} {f'{len(states)} x {k}':>11} {f'{own - prompt_len:+d} tok':>9} {cells}", flush=True)
        if rows:
            print(f"{'':>5} rows per decode step in the best calls: "
                  + ", ".join(f"{p} {r:.1f}" + (f" (+{h} steps of history)" if h else "") for (h, p), r in rows.items()))
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
