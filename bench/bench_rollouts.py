"""Engine utilisation and pipeline overhead of the rollout phase, with a simulated GPU engine.

The engine stands for a saturated GPU: a fixed latency per generated token, so a call costs ``ms_per_token``
x the tokens it generates (rows x ``tokens_per_step``). It writes real step code, so the real MCTS, the
real sandbox pool and the real Ray actors do everything else. Two runs side by side in one
process, same problems and seeds:

* ``groups=1``: each worker alternates strictly between generating a wave and executing it;
* ``groups=2``: two halves of the worker's trees alternate, so one half's code runs while the other half's
  batch is with the engine (the default).

Printed: engine utilisation (engine busy time / wall time) during rollouts, the ratio of the two, and the
pipeline's own overhead per expansion (worker time outside engine waits and sandbox calls: MCTS
bookkeeping, parsing, serialisation, Ray glue).

    .venv/bin/python bench/bench_rollouts.py [--problems 16] [--ms-per-token 2]

With ``--engine embedded`` the engine is the real transformers backend on the embedded SmolLM2-135M (CPU),
and the run also prints the rollout phase's tokens/s over the engine's own batch-64 tokens/s, measured in
this process before and after the rollouts (bench_generation's batch: 8 prompts x 8 samples; best of 3 calls
each time; the ratio uses the higher):

    .venv/bin/python bench/bench_rollouts.py --engine embedded --groups 2 --problems 8 --rollouts 2

``--problem-source builtin`` searches the embedded run's own training problems (``builtin:arithmetic``, difficulty
1, seed 0, graded by ``data.grade``) instead of the synthetic "Compute i + i." ones; with the embedded preset's
shape that is a rollout phase of ``make run``: round 1 is ``--problems 10 --rollouts 2 --children 4 --max-depth 6
--gen-mode solution --new-tokens 128 --temperature 0.8 --max-rows 32 --seed 0``; round 2 (on the base model here, not round
1's policy) ``--children 3 --gen-mode step --new-tokens 48``. The batch-64 reference always runs with at least 64 rows.

``--parallel 1,2`` also compares ``search.parallel_rollouts`` (rollouts of one tree in flight at once, with
virtual loss; ``mcts.search``): every (groups, parallel) pair runs, in that order. Parallel rollouts search other
trees, so compare their solved counts and expansions too, not only time.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcts.protocols import Proposal  # noqa: E402


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


class _Counter:
    new_tokens = 0


class SimulatedEngine:
    """Writes plausible steps with real code; sleeps a fixed time per generated token, like a busy GPU."""

    def __init__(self, answers: dict[str, str], ms_per_token: float, tokens_per_step: int):
        self.answers = answers
        self.s_per_token = ms_per_token / 1000.0
        self.tokens_per_step = tokens_per_step
        self.stats = _Counter()

    def propose(self, states, k):
        out = []
        for st in states:
            depth = st.history.count("<end_of_step>")
            props = []
            for j in range(k):
                v = (st.seed >> (4 * j)) % 9 + 1
                if depth >= 2 and j == 0:
                    props.append(Proposal(f"# So the answer is \\boxed{{{self.answers[st.tree_id]}}}", "<end_of_answer>"))
                elif depth >= 2 and j == 1:
                    props.append(Proposal(f"# So the answer is \\boxed{{{v}}}", "<end_of_answer>"))
                else:
                    code = f"x{depth} = {v} * {j + 1} + {depth}\nprint(x{depth})"
                    props.append(Proposal(f"# Work out part {depth} of the question.\n{code}", "<end_of_step>"))
            out.append(props)
        tokens = len(states) * k * self.tokens_per_step
        self.stats.new_tokens += tokens
        time.sleep(self.s_per_token * tokens)
        return out


def exact_grade(problem, answer):
    return answer == problem.answer


def run_once(groups: int, parallel: int, args: argparse.Namespace, problems: list[Problem]):
    from mcts.config import SearchConfig
    from pipeline.config import RayConfig, RunConfig, StorageConfig
    from pipeline.rollouts import Backends, RolloutConfig, run_rollouts
    from pipeline.runlog import RunLog, RunLogConfig
    from pipeline.sandbox import SandboxConfig, SandboxPool
    from pipeline.storage import TreeStore
    from rounds.schedule import RoundSpec

    cfg = RunConfig(seed=args.seed, storage=StorageConfig(shard_problems=8),
                    search=SearchConfig(parallel_rollouts=parallel, max_depth=args.max_depth),
                    sandbox=SandboxConfig(workers=args.sandbox_workers),
                    ray=RayConfig(num_cpus=2, rollout_workers=args.workers, policy_engines=1, cpus_per_engine=0.5,
                                  cpus_per_worker=0.5))
    spec = RoundSpec(policy="bootstrap", q_mode="terminal", rollouts=args.rollouts, children=args.children,
                     gen_mode=args.gen_mode)
    answers = {p.id: p.answer for p in problems}
    if args.engine == "embedded":
        from pipeline.engines import make_policy

        policy = functools.partial(make_policy, _embedded_cfg(args), mode=args.gen_mode, few_shot=True)
    else:
        policy = functools.partial(SimulatedEngine, answers, args.ms_per_token, args.tokens_per_step)
    grader = exact_grade
    if args.problem_source == "builtin":
        from data import grade as grader
    backends = Backends(policy=policy, executor=functools.partial(SandboxPool, cfg.sandbox), grader=grader)
    with tempfile.TemporaryDirectory() as d:
        store = TreeStore(Path(d) / "trees")
        log = RunLog(Path(d) / "log.jsonl", RunLogConfig(console=False))
        return run_rollouts(cfg, 1, spec, problems, "simulated", None, store, log,
                            settings=RolloutConfig(groups=groups), backends=backends)


def _embedded_cfg(args: argparse.Namespace, min_rows: int = 0):
    from pipeline.engines import EngineConfig, GenerationConfig

    return EngineConfig(device="cpu", cpu_fast_path=args.fast_path, max_batch_rows=max(args.max_rows, min_rows),
                        generation=GenerationConfig(temperature=args.temperature, max_new_tokens_step=args.new_tokens,
                                                    max_new_tokens_solution=args.new_tokens),
                        shared_prefix_attention=not args.flat, group_attention=args.group,
                        fused_admission=not args.unfused, packed_linears=not args.unpacked,
                        fused_kernels=not args.eager_kernels, fused_attention=not args.flash_attention)


def engine_batch64(args: argparse.Namespace):
    """The embedded engine that measures the batch-64 reference (bench_generation's batch 64: 8 prompts x 8
    samples), in the rollouts' generation mode and budget."""
    from pipeline.engines import make_policy

    pol = make_policy(_embedded_cfg(args, min_rows=64), mode=args.gen_mode, few_shot=True)
    pol.propose(_reference_states()[:1], 1)  # the shared prefix, computed once per engine lifetime
    return pol


def _reference_states():
    from mcts.protocols import SearchState

    return [SearchState(f"p{i}", f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples?", "", i)
            for i in range(8)]


def batch64_tokens_per_s(pol, repeats: int = 3) -> float:
    """``pol``'s tokens/s on the batch-64 reference call, best of ``repeats`` (one call swung by 15% between runs)."""
    best = 0.0
    for _ in range(repeats):
        before = pol.stats.new_tokens
        t0 = time.perf_counter()
        pol.propose(_reference_states(), 8)
        best = max(best, (pol.stats.new_tokens - before) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="rollout worker actors")
    parser.add_argument("--sandbox-workers", type=int, default=2)
    parser.add_argument("--ms-per-token", type=float, default=0.5, help="simulated engine time per generated token")
    parser.add_argument("--tokens-per-step", type=int, default=40)
    parser.add_argument("--groups", default="1,2", help="comma-separated tree-group counts to compare (1 first)")
    parser.add_argument("--parallel", default="1", help="comma-separated search.parallel_rollouts values to compare")
    parser.add_argument("--engine", choices=["simulated", "embedded"], default="simulated")
    parser.add_argument("--new-tokens", type=int, default=96,
                        help="embedded engine: max new tokens per step (per solution with --gen-mode solution)")
    parser.add_argument("--gen-mode", choices=["step", "solution"], default="step",
                        help="rounds.schedule.*.gen_mode: one step per expansion, or a whole solution (round 1)")
    parser.add_argument("--temperature", type=float, default=0.7, help="embedded engine: sampling temperature")
    parser.add_argument("--fast-path", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="embedded engine: engines.cpu_fast_path (fp32: a request's tokens do not depend on the "
                             "batch, so every grouping searches the same trees; bf16 on CPUs whose kernels change "
                             "with the row count does not)")
    parser.add_argument("--max-rows", type=int, default=64, help="embedded engine: engines.max_batch_rows")
    parser.add_argument("--seed", type=int, default=3, help="the run's seed (the embedded preset's: 0)")
    parser.add_argument("--max-depth", type=int, default=16, help="search.max_depth (the embedded preset's: 6)")
    parser.add_argument("--problem-source", choices=["synthetic", "builtin"], default="synthetic",
                        help="synthetic: 'Compute i + i.'; builtin: the embedded run's builtin:arithmetic problems")
    parser.add_argument("--flat", action="store_true", help="embedded engine: engines.shared_prefix_attention false "
                                                            "(every row holds the shared prefix; the engine before "
                                                            "2026-12-01)")
    parser.add_argument("--group", action="store_true", help="embedded engine: engines.group_attention true (a "
                                                             "request's sample rows attend to one copy of their "
                                                             "prompt's KV)")
    parser.add_argument("--unfused", action="store_true", help="embedded engine: engines.fused_admission false (a "
                                                               "forward per admission; the engine before 2026-12-02)")
    parser.add_argument("--unpacked", action="store_true", help="embedded engine: engines.packed_linears false (bf16 "
                                                                "linear layers reorder their weights on every call, "
                                                                "as torch's plain Linear does)")
    parser.add_argument("--eager-kernels", action="store_true", help="embedded engine: engines.fused_kernels false "
                                                                     "(transformers' own norms and RoPE)")
    parser.add_argument("--flash-attention", action="store_true", help="embedded engine: engines.fused_attention "
                                                                       "false (torch's flash kernel for each row's own "
                                                                       "cache)")
    args = parser.parse_args()

    import ray

    from pipeline.cluster import connect, disconnect
    from pipeline.config import RayConfig

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if args.problem_source == "builtin":
        from data.loaders import load_problems

        problems = load_problems("builtin:arithmetic", n=args.problems, difficulty=1, seed=0)
    else:
        problems = [Problem(f"b{i}", f"Compute {i} + {i}.", str(2 * i)) for i in range(args.problems)]
    reference = engine_batch64(args) if args.engine == "embedded" else None
    batch64 = batch64_tokens_per_s(reference) if reference is not None else 0.0
    cluster = connect(RayConfig(num_cpus=2))
    try:
        results = {f"g{g} p{p}": run_once(g, p, args, problems)
                   for g in sorted({int(x) for x in args.groups.split(",")})
                   for p in sorted({int(x) for x in args.parallel.split(",")})}
    finally:
        disconnect(cluster)
    # Measured again after the rollouts: a shared machine's speed drifts, and a ratio over a reference taken in
    # other conditions says little. The ratios below use the higher of the two (the harder bar).
    batch64_after = batch64_tokens_per_s(reference) if reference is not None else 0.0

    engine = (f"embedded SmolLM2-135M engine, <= {args.new_tokens} tokens per step" if args.engine == "embedded" else
              f"engine {args.ms_per_token} ms per token, {args.tokens_per_step} tokens per step")
    print(f"\nrollouts: {args.problems} {args.problem_source} problems x {args.rollouts} rollouts, k={args.children}, "
          f"max depth {args.max_depth}, {args.workers} worker(s), {engine}")
    print("g = tree groups per worker (rollouts.groups), p = rollouts of a tree in flight (search.parallel_rollouts)")
    print(f"{'run':>7} {'wall s':>8} {'expansions':>10} {'solved':>6} {'engine util':>11} {'exec s':>7} "
          f"{'overhead/exp ms':>15} {'tokens/s':>9}")
    for g, st in results.items():
        print(f"{g:>7} {st.wall_s:>8.2f} {st.expansions:>10} {st.solved:>6} {st.engine_utilisation:>11.1%} "
              f"{st.exec_s:>7.2f} {st.overhead_per_expansion_s * 1000:>15.2f} {st.tokens / st.wall_s:>9.0f}")
    if batch64:
        ref = max(batch64, batch64_after)
        print(f"engine's batch-64 reference: {batch64:.1f} tok/s before the rollouts, {batch64_after:.1f} after"
              + (" (the machine's speed changed during the run: compare with care)"
                 if abs(batch64 - batch64_after) > 0.15 * ref else ""))
        for g, st in results.items():
            print(f"{g}: rollout {st.tokens / st.wall_s:.1f} tok/s over the engine's batch-64 {ref:.1f} tok/s "
                  f"= {st.tokens / st.wall_s / ref:.0%}")
    for g, st in results.items():
        done = st.tree_done_s
        print(f"{g}: half of the {len(done)} trees were stored at {st.half_done_s:.0f} s of {st.wall_s:.0f} s; "
              f"each tree's end (s): {' '.join(f'{t:.0f}' for t in done)}")
    for g, st in results.items():
        if st.engine_parts_s:
            total = sum(st.engine_parts_s.values())
            parts = ", ".join(f"{p} {s:.1f} s ({s / total:.0%})" for p, s in st.engine_parts_s.items())
            print(f"{g}: {st.engine_rows_per_tick:.1f} rows per decode step; the running batch's time: {parts}")
    for g, st in results.items():
        if st.engine_prefix_hit_rate:
            print(f"{g}: {st.engine_prefix_hit_rate:.1%} of the requests' prompt tokens came from the engine's "
                  f"prefix cache (shared prefix + tree prefixes; vLLM: its prefix cache)")
    base_g = next(iter(results))
    base = results[base_g]
    for g, st in results.items():
        if g != base_g:
            print(f"{g} vs {base_g}: engine utilisation x{st.engine_utilisation / base.engine_utilisation:.2f}, "
                  f"wall time x{base.wall_s / st.wall_s:.2f} faster")

if __name__ == "__main__":
    main()
