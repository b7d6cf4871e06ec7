"""Round-1 bootstrap yield: how many training problems a base model solves with whole-solution samples.

    .venv/bin/python bench/bench_bootstrap.py                       # embedded preset, 1 vs 2 examples, ~2.5 min
    .venv/bin/python bench/bench_bootstrap.py --config configs/tiny.yaml --samples 4 --examples 1

For each ``--examples`` value it builds the preset's round-1 policy in the bootstrap round's settings
(solution mode, few-shot), samples ``--samples`` whole solutions at the root of every training problem of
the preset (the same problems and seeds for every variant), parses each as the search does
(``mcts.expand.parse_proposal``) and grades the final answer. It prints, per variant: problems with at least
one correct sample, correct samples, samples that reached an answer, how generation stopped, and why parts
were rejected. The code is not executed (that needs the search; ``bench_rollouts.py``), so this measures
the prompt and the parser, which is what decides whether round 1 finds any correct trajectory at all.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time


def run_variant(cfg, problems, examples: int, samples: int, room: int) -> dict:
    import data
    from mcts.expand import parse_proposal
    from mcts.protocols import SearchState
    from pipeline.engines import make_policy

    spec = cfg.rounds.schedule[0]
    engines = dataclasses.replace(cfg.engines, few_shot_examples=examples)
    model = cfg.engines.bootstrap_model or cfg.engines.policy_model  # round 1's policy
    policy = make_policy(engines, model=model, mode=spec.gen_mode, few_shot=spec.few_shot, seed=cfg.seed)
    states = [SearchState(str(p.id), p.question, "", i) for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    out = policy.propose(states, samples)
    wall = time.perf_counter() - t0
    solved = correct = answered = 0
    rejected: collections.Counter[str] = collections.Counter()
    for problem, proposals in zip(problems, out, strict=True):
        hit = False
        for proposal in proposals:
            chain = parse_proposal(proposal, room)
            if chain.rejected is not None:
                rejected[chain.rejected.error.split(" (")[0]] += 1
            answer = chain.steps[-1].answer if chain.steps else None
            if answer is not None:
                answered += 1
                if data.grade(problem, answer):
                    correct += 1
                    hit = True
        solved += hit
    stops = collections.Counter(str(p.stop) for ps in out for p in ps)
    return {"examples": examples, "wall_s": wall, "solved": solved, "correct": correct, "answered": answered,
            "stops": dict(stops), "rejected": dict(rejected.most_common(4))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--examples", type=int, nargs="+", default=[1, 2], help="few-shot example counts to compare")
    ap.add_argument("--samples", type=int, default=8, help="whole solutions per problem")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = ap.parse_args()

    import data
    from pipeline.config import load_config

    cfg = load_config(args.config, args.set)
    problems, _ = data.load_problems_config(cfg.problems)
    n = len(problems)
    print(f"{args.config}: {n} training problems x {args.samples} whole-solution samples, "
          f"temperature {cfg.engines.generation.temperature}, {cfg.engines.generation.max_new_tokens_solution} tokens max")
    for k in args.examples:
        r = run_variant(cfg, problems, k, args.samples, cfg.search.max_depth)
        print(f"examples={k}: solved {r['solved']}/{n} problems, correct {r['correct']}/{n * args.samples} samples, "
              f"answered {r['answered']}, {r['wall_s']:.0f}s\n    stops {r['stops']}\n    rejected {r['rejected']}")


if __name__ == "__main__":
    main()
