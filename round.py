"""The Ray job entry point: run rounds of self-evolution for one config.

    ray job submit --working-dir . -- python round.py --config configs/embedded.yaml [--rounds 1-4]
    python round.py --config configs/tiny.yaml --run-dir runs/mine --set search.c_puct=1.5

Run directly, it starts a local Ray cluster; with RAY_ADDRESS set (as under `ray job submit`) it joins that
cluster. Without --run-dir a fresh directory is made under storage.runs_dir. A run directory that already holds
a run continues it, exactly as `python -m pipeline.resume RUN_DIR` would. Exit status 2 means the config or the
arguments were rejected before any work started (and nothing was written), or that this Python lacks the
project's dependencies; 1 that the run failed (e.g. the cluster cannot hold the actors the config asks for).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

# What a round imports (pyproject.toml's dependencies, by import name); found without importing them.
NEEDED = ("ray", "yaml", "pyarrow", "torch", "transformers", "trl", "datasets", "tqdm")


def missing_dependencies(find=importlib.util.find_spec) -> list[str]:
    """The modules of ``NEEDED`` this interpreter cannot import ([] = it is the project's environment)."""
    return [name for name in NEEDED if find(name) is None]


def dependency_error(missing: list[str]) -> str:
    return (f"round.py: error: this Python ({sys.executable}) cannot import {', '.join(missing)}: it is not the "
            f"project's environment. Under `ray job submit` the job runs the `python` on the Ray head's PATH: start "
            f"the head from the project's venv (`source .venv/bin/activate && ray start --head`), or run "
            f"`make setup` (or `pip install -e .`) for the interpreter you use.")


def main(argv: list[str] | None = None) -> int:
    missing = missing_dependencies()  # first: a job started by the wrong interpreter says so, and what to do
    if missing:
        print(dependency_error(missing), file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="round.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/embedded.yaml")
    parser.add_argument("--run-dir", help="run directory (default: a fresh one under storage.runs_dir)")
    parser.add_argument("--rounds", help="which rounds to run: N or A-B (default: all in the schedule)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set rounds.schedule.1.rollouts=16 (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="continue an existing run even if the config changed, or take over a stale run lease")
    parser.add_argument("--verbose", action="store_true",
                        help="show every run-log event and what libraries print (warnings, load bars, trainer logs) "
                             "on the console; by default they go to RUN_DIR/log.jsonl and RUN_DIR/libraries.log")
    args = parser.parse_args(argv)

    from pipeline.engines.process import prepare_process

    prepare_process()  # first, before any library starts a thread or multiplies a matrix
    from pipeline.config import ConfigError, load_config
    from rounds.schedule import parse_round_range

    try:
        cfg = load_config(args.config, args.overrides)
        rounds = parse_round_range(args.rounds or f"1-{cfg.rounds.count}", cfg.rounds.count)
    except (ConfigError, ValueError) as e:
        print(f"round.py: error: {e}", file=sys.stderr)
        return 2

    from pipeline.driver import start

    return start(cfg, args.run_dir, rounds, force=args.force, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
