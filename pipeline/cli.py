"""The small CLI around a run: info, export, eval, config, capacity, solve.

    python -m pipeline info RUN_DIR                  (RUN_DIR: a path or a URI, e.g. s3://bucket/runs/x)
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
    from pipeline.storage import StorageError, opened_run

    try:
        with opened_run(args.run_dir, lease=False) as run:  # reads only; s3://...: downloaded without weights
            print(info(run.root, name=run.location))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _with_lease(args: argparse.Namespace, command) -> int:
    """Run ``command(local run root)`` holding the run lease: not while a driver runs; s3://... staged locally."""
    from pipeline.storage import StorageError, opened_run

    try:
        with opened_run(args.run_dir, force=args.force) as run:
            return command(run.root)
    except StorageError as e:  # LeaseHeld names the driver holding the run
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_export(args: argparse.Namespace) -> int:
    return _with_lease(args, lambda root: export_round_cli(root, args.round, Path(args.out) if args.out else None))


def _cmd_eval(args: argparse.Namespace) -> int:
    return _with_lease(args, lambda root: eval_round_cli(root, args.round,
                                                         Path(args.problems) if args.problems else None,
                                                         as_json=args.json, greedy_only=args.greedy_only))


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


def stored_run(run_dir: Path):
    """(config, RunDir) of a run directory, its config read from its config.yaml."""
    from pipeline.config import load_config
    from pipeline.storage import RunDir

    run = RunDir(run_dir)
    return load_config(run.config_path if run.config_path.is_file() else run_dir / "config.yaml"), run


def export_round_cli(run_dir: Path, round_no: int, out: Path | None) -> int:
    """``python -m pipeline export``: (re)write a round's four parquet files from its stored trees."""
    from pipeline.context import prompt_fn
    from pipeline.export import export_round
    from pipeline.storage import StorageError

    cfg, run = stored_run(run_dir)
    if not run.trees(round_no).completed_problem_ids():
        print(f"error: {run.trees_dir(round_no)}: no completed trees for round {round_no}", file=sys.stderr)
        return 2
    try:
        result = export_round(run, round_no, prompt_fn(cfg.engines.policy_model, few_shot=False), out_dir=out,
                              extract_config=cfg.search.extract)
    except StorageError as e:  # e.g. a damaged shard: the message names it and how to repair it
        print(f"error: {e}", file=sys.stderr)
        return 2
    for table, path in result.paths.items():
        print(f"{table:10s} {result.rows[table]:7d} rows  {path}")
    return 0


def eval_round_cli(run_dir: Path, round_no: int, problems_file: Path | None = None, as_json: bool = False,
                   greedy_only: bool = False) -> int:
    """``python -m pipeline eval``: evaluate a round's policy and PPM (round 0 = the bootstrap model in its
    bootstrap prompt) on the run's held-out set or on ``problems_file``. Returns the exit status."""
    import json

    from pipeline.cluster import connect
    from pipeline.context import load_run_problems, run_lineage
    from pipeline.evaluation import evaluate_model, full_eval
    from pipeline.runlog import RunLog
    from pipeline.storage import RunDir
    from rounds.report import fraction_text

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        print(f"error: {run_dir}: not a run directory (no config.yaml); pass the directory a run wrote",
              file=sys.stderr)
        return 2
    if round_no < 0:
        print(f"error: --round {round_no}: must be >= 0 (0 = the base model)", file=sys.stderr)
        return 2
    cfg, run = stored_run(run_dir)
    log = RunLog(run.log_path)
    if problems_file is None:
        _, problems = load_run_problems(cfg, run, log)
        out_dir = None
    else:
        problems, error = read_problems_file(problems_file)
        if error:
            print(f"error: --problems {problems_file}: {error}", file=sys.stderr)
            return 2
        out_dir = run.root / f"round_{round_no}" / f"eval_{Path(problems_file).stem}"
    lineage = run_lineage(cfg, run)
    trained = lineage.newest_policy(round_no) if round_no else None
    if round_no and trained is None and not run.round_dir(round_no).is_dir():
        print(f"error: {run_dir}: round {round_no} was never run; rounds present: {run.rounds()}", file=sys.stderr)
        return 2
    policy = trained or lineage.bootstrap
    ppm = lineage.newest_ppm(round_no) if round_no else None
    full = not greedy_only and full_eval(cfg, round_no)
    with connect(cfg.ray, log=log):
        result = evaluate_model(cfg, run, round_no, policy, ppm, problems, log, trained=trained is not None,
                                full=full, out_dir=out_dir)
    counts = result.get("counts", {})
    for key, counts_key in (("greedy_pass1", "greedy"), ("maj_at_k", "maj"), ("ppm_best_of_n", "best_of_n"),
                            ("ppm_mcts", "mcts")):
        c = counts.get(counts_key) or {}
        value = result["metrics"].get(key)
        text = fraction_text(c["correct"], c["problems"]) if value is not None and "correct" in c else "-"
        print(f"{key:15s} {text}")
    print(f"policy {policy}; ppm {ppm or '-'}; {len(problems)} problems; "
          f"eval.json in {out_dir or run.root / f'round_{round_no}'}")
    if as_json:
        g = counts.get("greedy") or {}
        summary = {"round": round_no, "n": len(problems), "policy": policy, "ppm": ppm,
                   **{k: v for k, v in result["metrics"].items() if k != "train_solved"},
                   "greedy_correct": g.get("correct"), "skipped": result.get("skipped", {})}
        print(json.dumps(summary))
    return 0


def read_problems_file(path: Path) -> tuple[list, str | None]:
    """(problems, None) from a user's jsonl/json/parquet/csv file, or ([], why it cannot be used)."""
    from data.loaders import FILE_FORMATS, ProblemSourceError, load_problems_with_report

    path = Path(path)
    if not path.is_file():
        return [], "no such file" if not path.exists() else "not a file"
    if not str(path).lower().endswith(FILE_FORMATS):
        return [], f"unsupported file type {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}"
    try:
        result = load_problems_with_report(str(path))
    except ProblemSourceError as e:
        return [], str(e).removeprefix(f"{path}: ")
    except (OSError, ValueError, UnicodeDecodeError) as e:  # a corrupt parquet, undecodable bytes
        return [], f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return result.problems, None


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
    p.add_argument("--force", action="store_true", help="take over a run lease gone stale")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="(re-)evaluate a round's policy and PPM on the held-out set or a problem file")
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, required=True, help="0 = the base model in its bootstrap prompt")
    p.add_argument("--problems", metavar="FILE",
                   help="a .jsonl/.json/.parquet/.csv problem file (default: the run's held-out set); the results "
                        "go to round_N/eval_<file stem>/eval.json")
    p.add_argument("--json", action="store_true", help="print one JSON object of the metrics as the last line")
    p.add_argument("--greedy-only", action="store_true", help="greedy pass@1 only (no sampling, no PPM)")
    p.add_argument("--force", action="store_true", help="take over a run lease gone stale")
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
    from pipeline.engines.process import prepare_process

    prepare_process()  # first, before any library starts a thread or multiplies a matrix
    return args.func(args)
