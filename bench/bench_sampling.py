"""The engine's top-p sampler against the top-k search it replaced, on the embedded model's own logits.

    .venv/bin/python bench/bench_sampling.py                      # batch 64: 8 prompts x 8 samples, 48 new tokens
    .venv/bin/python bench/bench_sampling.py --history-steps 6 --calls 6

Three samplers, each a function (logits, generators, temperature, top_p) -> one token per row, all drawing one
uniform per row from the row's own generator:

* ``topk``: probabilities out of place (``softmax(logits / T)``), nucleus looked for in each row's top 256
  (``torch.topk``), a full sort for a row whose mass there falls short: the engine's sampler before 2026-12-03;
* ``blocks``: the nucleus looked for in each row's 8 best vocabulary blocks of 64 tokens first
  (``hf_policy._top_p_in_blocks``), the top-k search for the rows those cannot settle; still out of place;
* ``blocks+inplace``: as the engine samples now: the running batch's logits turned into probabilities in place.

Part 1 runs batch-64 calls of one engine (``bench_generation``'s batch), the three samplers alternating, and
prints per call the engine's sampling seconds (``GenStats.sample_s``) and tokens/s. Part 2 replays the logits of
one call (every decode step's, captured) through each sampler and prints milliseconds per step and how many
rows pick the same token as ``topk`` from the same uniform (tied tokens: ``blocks`` orders them by token id,
topk its own way, so a tie at the nucleus' edge can differ). The machine is shared: compare the samplers within
one run.
"""

from __future__ import annotations

import argparse
import time


def samplers() -> dict:
    import torch

    from pipeline.engines.hf_policy import TransformersPolicy, _top_p_picks

    def topk(logits, gens, temperature, top_p, overwrite=False):
        probs = torch.softmax(logits / temperature, dim=-1)
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in gens]).to(probs.dtype)
        return _top_p_picks(probs, u, top_p)

    def topk_inplace(logits, gens, temperature, top_p, overwrite=False):
        probs = torch.ops.aten._softmax.out(logits.div_(temperature), -1, False, out=logits)
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in gens]).to(probs.dtype)
        return _top_p_picks(probs, u, top_p)

    def blocks(logits, gens, temperature, top_p, overwrite=False):
        return TransformersPolicy._sample(logits, gens, temperature, top_p)

    return {"topk": topk, "topk+inplace": topk_inplace, "blocks": blocks, "blocks+inplace": TransformersPolicy._sample}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4, help="batch-64 calls per sampler, alternating")
    ap.add_argument("--history-steps", type=int, default=0, help="executed steps of history in every prompt")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--fast-path", default="auto", help="engines.cpu_fast_path (auto: the probe's pick)")
    args = ap.parse_args()

    import torch
    from bench_generation import _states

    from pipeline.engines import EngineConfig, GenerationConfig, compute, make_policy

    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=args.new_tokens)
    pol = make_policy(EngineConfig(device="cpu", max_batch_rows=64, generation=gen, cpu_fast_path=args.fast_path),
                      mode="step", few_shot=True)
    states = _states(8, history_steps=args.history_steps)
    pol.propose(states, 8)  # warm: the shared prefix and the prompts' KV computed, as in a long-lived engine
    fns = samplers()
    print(f"part 1: batch-64 calls (8 prompts x 8 samples, {args.new_tokens} new tokens, "
          f"+{args.history_steps} history steps), samplers alternating")
    rows = {name: [] for name in fns}
    for _ in range(args.calls):
        for name, fn in fns.items():
            pol.batch.sample = fn
            n0, s0, t0 = pol.stats.new_tokens, pol.stats.sample_s, time.perf_counter()
            pol.propose(states, 8)
            wall = time.perf_counter() - t0
            rows[name].append((pol.stats.sample_s - s0, (pol.stats.new_tokens - n0) / wall))
    for name, got in rows.items():
        print(f"{name:>15}: sampling {' '.join(f'{s:.2f}' for s, _ in got)} s a call; "
              f"{' '.join(f'{t:.1f}' for _, t in got)} tok/s")

    captured = []

    def capture(logits, gens, temperature, top_p, overwrite=False):
        captured.append((logits.clone(), [g.get_state() for g in gens], temperature, top_p))
        return fns["topk"](logits, gens, temperature, top_p)

    pol.batch.sample = capture
    pol.propose(states, 8)
    pol.batch.sample = fns["blocks+inplace"]

    def replay() -> None:
        ref_picks, times = None, {}
        for name, fn in fns.items():
            picks, t = [], 0.0
            for logits, seeds, temperature, top_p in captured:
                gens = []
                for state in seeds:
                    g = torch.Generator()
                    g.set_state(state)
                    gens.append(g)
                scratch = logits.clone()
                t0 = time.perf_counter()
                picks.append(fn(scratch, gens, temperature, top_p, overwrite=True))
                t += time.perf_counter() - t0
            times[name] = t / len(captured) * 1e3
            flat = torch.cat(picks)
            if ref_picks is None:
                ref_picks = flat
            same = int((flat == ref_picks).sum())
            print(f"{name:>15}: {times[name]:.1f} ms a step; {same}/{len(flat)} rows pick topk's token")

    print(f"part 2: {len(captured)} captured decode steps ({sum(c[0].shape[0] for c in captured)} rows) replayed")
    compute.run(replay)  # on the engines' compute thread, like the engine's own sampling


if __name__ == "__main__":
    main()
