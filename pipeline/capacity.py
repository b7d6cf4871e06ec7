"""A capacity model: what a run of CONFIG on N problems costs on a stated cluster, from a measured run's log.

    python -m pipeline capacity configs/qwen2.5-math-7b.yaml --problems 747000 --from-log runs/emb/log.jsonl \\
        --gpus 64 --sandbox-cpus 1024 --engine-tok-s 2500
    python -m pipeline capacity runs/emb/config.yaml --from-log runs/emb/log.jsonl --check

Inputs, per round, from the measured run's ``rollouts.summary`` events (``pipeline.rollouts``):

- expansions per (problem x configured rollout): how much search one rollout takes (depends on solve rate);
- tokens per proposal (one candidate step), and nodes kept per proposal;
- engine tokens/s: tokens / engine-busy seconds, per engine (override with ``--engine-tok-s`` for other hardware);
- sandbox seconds per proposal (every candidate's code runs once) and PPM seconds per new node;
- pipeline overhead per expansion (MCTS bookkeeping, serialisation, Ray glue), on the rollout workers.

The rounds' "unsolved_rollouts" escalation (round 4) is not modelled: its extra rollouts are not counted.

Model of one round's rollouts, for ``rollouts`` and ``children`` from CONFIG's schedule:
``expansions = N * rollouts * e``, ``proposals = expansions * children``; generation and PPM scoring share the
GPUs (GPU-seconds add), the sandbox runs on ``--sandbox-cpus`` cores, the overhead on the rollout workers; the
round's wall time is the largest of the three divided by its resources, and that one is the bottleneck. Training
and evaluation are not modelled. A target round uses the costs of a measured round with the same generation and Q mode (``source_round``).
PPM seconds are worker-side waiting, so queueing is included: an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Costs:
    """Per-unit costs measured in one round's rollouts."""

    round: int
    expansions_per_problem_rollout: float
    tokens_per_proposal: float
    nodes_per_proposal: float
    engine_tok_s: float  # per engine
    sandbox_s_per_proposal: float
    ppm_s_per_node: float
    overhead_s_per_expansion: float
    measured_wall_s: float
    measured_problems: int
    measured_engines: int


@dataclass(frozen=True)
class Cluster:
    gpus: int  # policy engines, one per GPU; the PPM shares them
    sandbox_cpus: int
    rollout_workers: int


@dataclass(frozen=True)
class RoundEstimate:
    round: int
    expansions: float
    proposals: float
    tokens: float
    gen_gpu_s: float
    ppm_gpu_s: float
    sandbox_cpu_s: float
    overhead_s: float
    wall_s: float
    bottleneck: str

    def gpu_hours(self, cluster: Cluster) -> float:
        return self.wall_s * cluster.gpus / 3600


def measured_costs(log_path: str | Path, rollouts_by_round: dict[int, int]) -> dict[int, Costs]:
    """Costs per round from a run's log; ``rollouts_by_round`` is the measured run's configured rollouts."""
    from pipeline.runlog import read_log

    summaries = {e["round"]: e for e in read_log(log_path) if e.get("event") == "rollouts.summary" and e.get("done")}
    if not summaries:
        raise ValueError(f"{log_path}: no rollouts.summary event with finished problems; run at least one round's "
                         f"rollouts to measure costs")
    costs = {}
    for r, e in sorted(summaries.items()):
        proposals, nodes, expansions = max(1, e["proposals"]), max(1, e["nodes"]), max(1, e["expansions"])
        costs[r] = Costs(
            round=r,
            expansions_per_problem_rollout=e["expansions"] / (e["done"] * rollouts_by_round[r]),
            tokens_per_proposal=e["tokens"] / proposals,
            nodes_per_proposal=e["nodes"] / proposals,
            engine_tok_s=e["tokens"] / e["engine_busy_s"] if e["engine_busy_s"] > 0 else float("nan"),
            sandbox_s_per_proposal=e["exec_s"] / proposals,
            ppm_s_per_node=e["score_wait_s"] / nodes,
            overhead_s_per_expansion=e["overhead_per_expansion_s"] if expansions else 0.0,
            measured_wall_s=e["wall_s"], measured_problems=e["done"], measured_engines=e["engines"])
    return costs


def estimate_round(c: Costs, problems: int, rollouts: int, children: int, cluster: Cluster,
                   engine_tok_s: float | None = None, ppm_s_per_node: float | None = None) -> RoundEstimate:
    expansions = problems * rollouts * c.expansions_per_problem_rollout
    proposals = expansions * children
    tokens = proposals * c.tokens_per_proposal
    gen = tokens / (engine_tok_s or c.engine_tok_s)
    ppm = proposals * c.nodes_per_proposal * (c.ppm_s_per_node if ppm_s_per_node is None else ppm_s_per_node)
    sandbox = proposals * c.sandbox_s_per_proposal
    overhead = expansions * c.overhead_s_per_expansion
    per_resource = {"gpu (generation + PPM)": (gen + ppm) / cluster.gpus, "sandbox cpus": sandbox / cluster.sandbox_cpus,
                    "rollout workers (search overhead)": overhead / cluster.rollout_workers}
    bottleneck = max(per_resource, key=per_resource.get)
    return RoundEstimate(round=c.round, expansions=expansions, proposals=proposals, tokens=tokens, gen_gpu_s=gen,
                         ppm_gpu_s=ppm, sandbox_cpu_s=sandbox, overhead_s=overhead,
                         wall_s=per_resource[bottleneck], bottleneck=bottleneck)


def source_round(spec, round_no: int, measured_schedule: list, costs: dict[int, Costs]) -> int:
    """The measured round whose costs stand for a target round: the same generation mode and Q mode (solution
    vs step tokens differ ~3x, PPM rounds add scoring), the nearest round number among those; else the nearest."""
    def alike(r: int) -> bool:
        m = measured_schedule[r - 1]
        return (m.gen_mode, m.q_mode) == (spec.gen_mode, spec.q_mode)

    pool = [r for r in costs if alike(r)] or list(costs)
    return min(pool, key=lambda r: (abs(r - round_no), r))


def estimate(cfg, costs: dict[int, Costs], problems: int, cluster: Cluster, engine_tok_s: float | None = None,
             ppm_s_per_node: float | None = None, measured_schedule: list | None = None) -> list[RoundEstimate]:
    """One estimate per round of ``cfg``'s schedule (``cfg``: a pipeline.config.RunConfig; ``measured_schedule``:
    the measured run's, to pick each round's costs by ``source_round``; None: the same round number)."""
    out = []
    for i, spec in enumerate(cfg.rounds.schedule, start=1):
        src = source_round(spec, i, measured_schedule, costs) if measured_schedule else min(costs, key=lambda r: abs(r - i))
        c = costs[src]
        n = min(problems, spec.problems) if spec.problems else problems
        # A PPM round's cost applies only where the target round is PPM-guided too.
        ppm = ppm_s_per_node if spec.q_mode == "ppm" else 0.0
        out.append(estimate_round(c, n, spec.rollouts, spec.children, cluster, engine_tok_s, ppm))
    return out


def _hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.1f} s"


def table(rows: list[RoundEstimate], cluster: Cluster) -> str:
    lines = ["| round | costs of | expansions | tokens | GPU-s gen | GPU-s PPM | sandbox CPU-s | wall | GPU-hours | "
             "bottleneck |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(rows, start=1):
        lines.append(f"| {i} | measured round {e.round} | {e.expansions:,.0f} | {e.tokens:,.0f} | {e.gen_gpu_s:,.0f} | {e.ppm_gpu_s:,.0f} | "
                     f"{e.sandbox_cpu_s:,.0f} | {_hms(e.wall_s)} | {e.gpu_hours(cluster):,.1f} | {e.bottleneck} |")
    total = sum(e.wall_s for e in rows)
    lines.append(f"| all | | | {sum(e.tokens for e in rows):,.0f} | | | | {_hms(total)} | "
                 f"{sum(e.gpu_hours(cluster) for e in rows):,.1f} | |")
    return "\n".join(lines)


def inputs_table(costs: dict[int, Costs]) -> str:
    lines = ["| measured round | expansions / (problem x rollout) | tokens / proposal | nodes / proposal | "
             "engine tok/s | sandbox ms / proposal | PPM ms / node | overhead ms / expansion |",
             "|---|---|---|---|---|---|---|---|"]
    for c in costs.values():
        lines.append(f"| {c.round} | {c.expansions_per_problem_rollout:.2f} | {c.tokens_per_proposal:.1f} | "
                     f"{c.nodes_per_proposal:.2f} | {c.engine_tok_s:.1f} | {c.sandbox_s_per_proposal * 1e3:.2f} | "
                     f"{c.ppm_s_per_node * 1e3:.1f} | {c.overhead_s_per_expansion * 1e3:.2f} |")
    return "\n".join(lines)


def check(cfg, costs: dict[int, Costs]) -> tuple[str, float]:
    """Predict the measured run's own rollouts (its problems, engines, sandbox) and compare with its wall time.

    Returns the table and the largest |predicted / measured - 1|. The costs come from the same run, so this checks
    the model's composition (what adds, what overlaps), not its transfer to other hardware.
    """
    lines = ["| round | predicted s | measured s | predicted / measured | bottleneck |", "|---|---|---|---|---|"]
    worst = 0.0
    for r, c in costs.items():
        spec = cfg.rounds.schedule[r - 1]
        cluster = Cluster(gpus=c.measured_engines, sandbox_cpus=cfg.sandbox.workers * cfg.ray.rollout_workers,
                          rollout_workers=cfg.ray.rollout_workers)
        e = estimate_round(c, c.measured_problems, spec.rollouts, spec.children, cluster)
        ratio = e.wall_s / c.measured_wall_s
        worst = max(worst, abs(ratio - 1))
        lines.append(f"| {r} | {e.wall_s:.1f} | {c.measured_wall_s:.1f} | {ratio:.2f} | {e.bottleneck} |")
    return "\n".join(lines), worst


def main(args) -> int:
    """``python -m pipeline capacity`` (arguments parsed by pipeline.cli)."""
    import sys

    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
        log = Path(args.from_log)
        measured_cfg = load_config(log.parent / "config.yaml")
        costs = measured_costs(log, {i: s.rollouts for i, s in enumerate(measured_cfg.rounds.schedule, start=1)})
    except (ConfigError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Inputs measured in {log}:\n\n{inputs_table(costs)}\n")
    if args.check:
        text, worst = check(measured_cfg, costs)
        print(f"Check against the measured run (its own costs, problems, engines):\n\n{text}\n\n"
              f"largest error: {worst:.0%}")
        return 0
    cluster = Cluster(gpus=args.gpus, sandbox_cpus=args.sandbox_cpus or cfg.sandbox.workers * args.gpus,
                      rollout_workers=args.rollout_workers or args.gpus)
    ppm = None if args.ppm_ms_per_node is None else args.ppm_ms_per_node / 1e3
    rows = estimate(cfg, costs, args.problems, cluster, args.engine_tok_s, ppm, list(measured_cfg.rounds.schedule))
    print(f"Estimate for {args.config}, {args.problems:,} problems, {cluster.gpus} GPUs, {cluster.sandbox_cpus} "
          f"sandbox CPUs, {cluster.rollout_workers} rollout workers"
          + (f", {args.engine_tok_s:g} tok/s per engine" if args.engine_tok_s else ", measured tok/s")
          + (f", {args.ppm_ms_per_node:g} ms PPM per node" if args.ppm_ms_per_node is not None else "") + ":\n")
    print(table(rows, cluster))
    return 0
