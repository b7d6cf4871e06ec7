"""The small CLI around a run: info, export, eval, config, capacity, solve.

    python -m pipeline info RUN_DIR
    python -m pipeline export RUN_DIR --round 2 --out exported/
    python -m pipeline eval RUN_DIR --round 2
    python -m pipeline eval RUN_DIR --round 0 --problems my_benchmark.jsonl --json
    python -m pipeline config configs/embedded.yaml --set rounds.schedule.0.rollouts=4
    python -m pipeline capacity configs/qwen2.5-math-7b.yaml --problems 747000 --from-log runs/x/log.jsonl --gpus 64
    python -m pipeline solve --run runs/emb --round 4 --strategy beam --budget 8 --out solve/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from pipeline.info import info
    from pipeline.storage import StorageError

    try:
        print(info(Path(args.run_dir)))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.driver import export_round_cli

    return export_round_cli(Path(args.run_dir), args.round, Path(args.out) if args.out else None)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.driver import eval_round_cli

    return eval_round_cli(Path(args.run_dir), args.round, Path(args.problems) if args.problems else None,
                          as_json=args.json, greedy_only=args.greedy_only)


def _cmd_config(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    return 0


def _cmd_capacity(args: argparse.Namespace) -> int:
    from pipeline.capacity import main as capacity

    return capacity(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Inspect, export, evaluate and solve with runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="one-page summary of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="write a round's sft / ppm_pairs / steps / trees parquet files")
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--out", help="output directory (default: the round directory)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="(re-)evaluate a round's policy and PPM on the held-out set or a problem file")
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, required=True, help="0 = the base model in its bootstrap prompt")
    p.add_argument("--problems", metavar="FILE",
                   help="a .jsonl/.json/.parquet/.csv problem file (default: the run's held-out set); the results "
                        "go to round_N/eval_<file stem>/eval.json")
    p.add_argument("--json", action="store_true", help="print one JSON object of the metrics as the last line")
    p.add_argument("--greedy-only", action="store_true", help="greedy pass@1 only (no sampling, no PPM)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("config", help="validate a preset and print the resolved config")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("capacity", help="estimate wall time, GPU-hours and the bottleneck of CONFIG on N problems "
                                        "from a measured run's per-expansion costs")
    p.add_argument("config")
    p.add_argument("--from-log", required=True, metavar="RUN/log.jsonl", help="a measured run's log")
    p.add_argument("--problems", type=int, default=0, help="problems per round (default: as in the config)")
    p.add_argument("--gpus", type=int, default=1, help="policy engines, one per GPU (the PPM shares them)")
    p.add_argument("--sandbox-cpus", type=int, default=0, help="cores running code (default: sandbox.workers x gpus)")
    p.add_argument("--rollout-workers", type=int, default=0, help="rollout worker actors (default: one per GPU)")
    p.add_argument("--engine-tok-s", type=float, help="tokens/s of one engine on the target (default: as measured)")
    p.add_argument("--ppm-ms-per-node", type=float, help="PPM milliseconds per new node on the target (default: as "
                                                          "measured in a PPM-guided round)")
    p.add_argument("--check", action="store_true", help="predict the measured run itself and compare")
    p.set_defaults(func=_cmd_capacity)

    from pipeline.solve import add_parser as add_solve

    add_solve(sub)

    args = parser.parse_args(argv)
    from pipeline.engines.malloc import limit_arenas

    limit_arenas()  # first, before any library starts a thread (pipeline/engines/malloc.py)
    return args.func(args)
