"""Generation throughput of the transformers backend on the embedded model, at several batch sizes.

    .venv/bin/python bench/bench_generation.py                      # batches 1 8 32 64, ~4 min on 2 cores
    .venv/bin/python bench/bench_generation.py --batches 1 8 --baseline-max 8 --new-tokens 16

A batch of B rows is B/k distinct few-shot prompts x k samples each (k = min(B, 8): one MCTS expansion asks
for 5-8 children), i.e. what one search wave sends. Throughput = sampled tokens / wall seconds of the
whole call, prefill included (the engine's shared instruction+examples prefix is computed before timing:
it is computed once per engine lifetime). The baseline is plain ``model.generate`` on the same prompts
(left padding, ``num_return_sequences=k``, stop strings): it prefills every prompt k times. Both run side
by side in this one process, alternating, ``--repeats`` times each; the best (least disturbed) run of each
is reported, since the machine is shared and absolute numbers swing with load.
"""

from __future__ import annotations

import argparse
import time


def _states(n: int):
    from mcts.protocols import SearchState

    return [SearchState(f"p{i}", f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples does he have?",
                        "", i) for i in range(n)]


def _baseline(policy, states, k: int, new_tokens: int) -> tuple[int, float]:
    import torch

    tok = policy.tokenizer
    tok.padding_side = "left"
    prompts = [policy.builder.build(s.question, s.history) for s in states]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(
            **enc, do_sample=True, temperature=policy.gen.temperature, top_p=policy.gen.top_p,
            max_new_tokens=new_tokens, num_return_sequences=k, stop_strings=list(policy.stops), tokenizer=tok,
            pad_token_id=policy.pad_id,
        )
    seconds = time.perf_counter() - t0
    generated = out[:, enc.input_ids.shape[1]:]
    return int((generated != policy.pad_id).sum()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="rows per call")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per row")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per batch size; the best is kept")
    ap.add_argument("--baseline-max", type=int, default=32, help="run model.generate only up to this batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from pipeline.engines import EngineConfig, GenerationConfig, make_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=args.new_tokens)
    policy = make_policy(EngineConfig(device="cpu", max_batch_rows=max(args.batches), generation=gen),
                         mode="step", few_shot=True)
    prompt_len = len(policy.tokenizer(policy.builder.build(_states(1)[0].question))["input_ids"])
    policy.propose(_states(1), 1)  # computes the shared prefix once, as a long-lived engine would
    print(f"embedded SmolLM2-135M, CPU, torch threads={torch.get_num_threads()}, prompt ~{prompt_len} tokens "
          f"(shared prefix {len(policy._prefix_ids)}), <= {args.new_tokens} new tokens per row, step mode")
    print(f"{'batch':>5} {'prompts x k':>11} {'tokens':>6} {'engine tok/s':>12} "
          f"{'generate tok/s':>14} {'speedup':>7}")
    for batch in args.batches:
        k = min(batch, 8)
        states = _states(max(1, batch // k))
        best, base_best = 0.0, 0.0
        for _ in range(args.repeats):
            before = policy.stats.new_tokens
            t0 = time.perf_counter()
            policy.propose(states, k)
            seconds = time.perf_counter() - t0
            tokens = policy.stats.new_tokens - before
            best = max(best, tokens / seconds)
            if batch <= args.baseline_max:
                b_tokens, b_seconds = _baseline(policy, states, k, args.new_tokens)
                base_best = max(base_best, b_tokens / b_seconds)
        base = f"{base_best:14.1f}" if base_best else ""
        ratio = f"{best / base_best:6.1f}x" if base_best else ""
        print(f"{batch:>5} {f'{len(states)} x {k}':>11} {tokens:>6} {best:>12.1f} {base:>14} {ratio:>7}", flush=True)

if __name__ == "__main__":
    main()
