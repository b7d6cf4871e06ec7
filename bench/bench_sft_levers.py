"""Which SFT settings make the round-1 policy better: train on a few self-generated rows, evaluate greedy.

    .venv/bin/python bench/bench_sft_levers.py                                   # embedded preset, all variants
    .venv/bin/python bench/bench_sft_levers.py --variants base-boot fs-1e-4x10 --heldout 20
    .venv/bin/python bench/bench_sft_levers.py --problems my_heldout.jsonl --train 10 --rollouts 2

1. Data, as round 1 makes it: the preset's bootstrap policy (whole solutions, few-shot) searches ``--train``
   training problems with the real MCTS and sandbox (``--rollouts`` x ``--children``); the SFT records are
   extracted as the export does (``mcts.extract``, top-2 correct trajectories per problem). Cached in
   ``--out``/sft_records.jsonl, so variants and reruns share the same rows.
2. Each variant trains the base model on those rows (``rounds.train_policy``) and decodes greedily on the
   held-out problems (the preset's held-out split, or ``--problems FILE``) through the search engine, exactly as
   the pipeline's greedy pass@1 does (``rounds.evaluate.run_chains``). Variant names:

   - ``base-boot``: the untrained base model in its bootstrap prompt (round 0 of a run);
   - ``base-step``: the base model in step mode with the few-shot examples;
   - ``{fs|plain}-{lr}x{epochs}``: SFT with the few-shot prompt (``fs``, and searched few-shot) or the bare
     prompt (``plain``, searched without examples), at that learning rate for that many epochs.

It prints, per variant: greedy k/n with the 95% Wilson interval, answered chains, the share of non-final steps
in the greedy outputs that hold code, and wall seconds for training and for evaluation. The machine is shared:
compare variants of one run; absolute seconds depend on the other work running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def search_data(cfg, problems, rollouts: int, children: int, out: Path) -> list[dict]:
    """Round-1 SFT records (question + completion + Q) from a real search of ``problems``; cached in ``out``."""
    cache = out / "sft_records.jsonl"
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    import data
    from mcts.extract import extract
    from mcts.search import TreeSearch
    from mcts.seeds import tree_seed
    from mcts.wave import run_search
    from pipeline.engines import make_policy
    from pipeline.sandbox import SandboxPool

    spec = cfg.rounds.schedule[0]
    model = cfg.engines.bootstrap_model or cfg.engines.policy_model
    policy = make_policy(cfg.engines, model=model, mode=spec.gen_mode, few_shot=spec.few_shot, seed=cfg.seed)
    scfg = dataclasses.replace(cfg.search, mode="terminal", rollouts=rollouts, children=children)
    searches = [TreeSearch(p, scfg, tree_seed(cfg.seed, 1, str(p.id)), data.grade, 1) for p in problems]
    t0 = time.perf_counter()
    with SandboxPool(cfg.sandbox) as pool:
        run_search(searches, policy, pool)
    rows = []
    code_steps = steps = 0
    for s in searches:
        for rec in extract(s.tree, cfg.search.extract).sft:
            rows.append(dataclasses.asdict(rec))
        for node in s.tree.nodes.values() if isinstance(s.tree.nodes, dict) else s.tree.nodes:
            if node.depth > 0 and node.answer is None:
                steps += 1
                code_steps += bool(node.code.strip())
    solved = sum(any(n.verdict == "correct" for n in s.tree.terminals()) for s in searches)
    print(f"search: {solved}/{len(problems)} training problems solved, {len(rows)} SFT rows, "
          f"non-final steps with code {code_steps}/{steps}, {time.perf_counter() - t0:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def code_share(solutions: list[str]) -> tuple[int, int]:
    """(non-final steps holding code, non-final steps) over rendered greedy solutions."""
    from mcts.steps import StepFormatError, parse_step, split_steps

    code = total = 0
    for text in solutions:
        for piece in split_steps(text):
            try:
                step = parse_step(piece)
            except StepFormatError:
                continue
            if not step.is_final:
                total += 1
                code += bool(step.code.strip())
    return code, total


def greedy(cfg, model: str, mode: str, few_shot: bool, problems, pool) -> dict:
    import data
    from pipeline.engines import make_policy, with_generation
    from rounds.evaluate import run_chains

    gen = dataclasses.replace(cfg.engines.generation, temperature=0.0)
    policy = with_generation(make_policy(cfg.engines, model=model, mode=mode, few_shot=few_shot, seed=cfg.seed), gen)
    t0 = time.perf_counter()
    chains = run_chains(problems, 1, policy, pool, data.grade, cfg.search, cfg.seed, 1, "greedy")
    solutions = [c[0].solution for c in chains]
    code, total = code_share(solutions)
    return {"correct": sum(c[0].correct for c in chains), "answered": sum(c[0].answer is not None for c in chains),
            "code_steps": code, "steps": total, "eval_s": time.perf_counter() - t0,
            "example": next((s for s in solutions if s), "")}


def train(cfg, rows: list[dict], few_shot: bool, lr: float, epochs: float, out: Path) -> tuple[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.schemas import SFT_SCHEMA
    from pipeline.engines import prompt_builder
    from rounds.train_policy import train_policy

    builder = prompt_builder(cfg.engines.policy_model, few_shot=few_shot, n_examples=cfg.engines.few_shot_examples)
    table = [dict({k: v for k, v in r.items() if k != "prefix"}, prompt=builder.build(r["question"], r["prefix"]))
             for r in rows]
    sft = out / "sft.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=SFT_SCHEMA), sft)
    stage = dataclasses.replace(cfg.training.policy, lr=lr, epochs=epochs, max_steps=0)
    tcfg = dataclasses.replace(cfg.training, policy=stage)
    t0 = time.perf_counter()
    result = train_policy(cfg.engines.policy_model, sft, out / "policy", tcfg)
    print(f"    trained {result.steps} steps on {len(rows)} rows, final loss {result.final_loss:.3f}")
    return str(out / "policy"), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--problems", help="held-out problem file (default: the preset's held-out split)")
    ap.add_argument("--heldout", type=int, default=50, help="held-out problems evaluated")
    ap.add_argument("--train", type=int, default=10, help="training problems searched for SFT rows")
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--variants", nargs="+",
                    default=["base-boot", "base-step", "plain-2e-5x2", "plain-1e-4x10", "fs-1e-4x10", "fs-1e-4x4"])
    ap.add_argument("--out", default="/tmp/bench_sft_levers")
    args = ap.parse_args()

    import data
    from pipeline.config import load_config
    from pipeline.sandbox import SandboxPool
    from rounds.report import fraction_text

    cfg = load_config(args.config, args.set)
    train_problems, held = data.load_problems_config(cfg.problems)
    if args.problems:
        held = data.load_problems(args.problems)
    held = held[: args.heldout]
    out = Path(args.out)
    print(f"{args.config} {args.set}: {args.train} training problems searched, {len(held)} held-out problems; "
          f"machine shared with other work, compare variants within this run")
    rows = search_data(cfg, train_problems[: args.train], args.rollouts, args.children, out)
    spec = cfg.rounds.schedule[0]
    boot = cfg.engines.bootstrap_model or cfg.engines.policy_model
    with SandboxPool(cfg.sandbox) as pool:
        for name in args.variants:
            train_s = 0.0
            if name == "base-boot":
                r = greedy(cfg, boot, spec.gen_mode, spec.few_shot, held, pool)
            elif name == "base-step":
                r = greedy(cfg, cfg.engines.policy_model, "step", True, held, pool)
            else:
                prompt, rest = name.split("-", 1)
                lr, epochs = rest.rsplit("x", 1)
                if not rows:
                    print(f"{name}: no SFT rows to train on")
                    continue
                model, train_s = train(cfg, rows, prompt == "fs", float(lr), float(epochs), out / name)
                r = greedy(cfg, model, "step", prompt == "fs", held, pool)
            n = len(held)
            print(f"{name:14s} greedy {fraction_text(r['correct'], n)}  answered {r['answered']}/{n}  "
                  f"code steps {r['code_steps']}/{r['steps']}  train {train_s:.0f}s  eval {r['eval_s']:.0f}s",
                  flush=True)
            print("    e.g. " + r["example"][:300].replace("\n", "\n         "))


if __name__ == "__main__":
    main()
