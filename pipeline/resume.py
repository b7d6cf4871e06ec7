"""Continue a run after a crash or a stop: ``python -m pipeline.resume RUN_DIR [--rounds A-B] [--force]``.

Reads the run's stored config.yaml, skips every phase whose completion marker exists (problems already in
a completed tree shard, exports, training, eval) and continues. A finished run says so and does nothing.
Overrides (--set) that change the config are refused unless --force, with the diff of what changed.
Only one driver runs a run directory at a time (``pipeline.lease``): while another holds it, resume is refused
with its host, pid and start time; a lease whose holder stopped heartbeating is taken over with --force.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory holding config.yaml: a path or a URI (s3://bucket/run)")
    parser.add_argument("--rounds", help="rounds to run: N or A-B (default: all in the stored schedule)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true",
                        help="resume even if --set changes the stored config, or take over a stale run lease")
    parser.add_argument("--verbose", action="store_true",
                        help="show every run-log event and what libraries print on the console (default: the run's "
                             "log files only)")
    args = parser.parse_args(argv)

    from pipeline.engines.process import prepare_process

    prepare_process()  # first, before any library starts a thread or multiplies a matrix
    from pipeline.config import ConfigError, load_config
    from pipeline.storage import StorageError, stored_config
    from rounds.schedule import parse_round_range

    try:
        with stored_config(args.run_dir) as stored:  # a path or a URI (s3://...)
            if not stored.is_file():
                print(f"pipeline.resume: error: {str(args.run_dir).rstrip('/')}/config.yaml: no such file; is "
                      f"{args.run_dir} a run directory?", file=sys.stderr)
                return 2
            cfg = load_config(stored, args.overrides)
        rounds = parse_round_range(args.rounds or f"1-{cfg.rounds.count}", cfg.rounds.count)
    except (ConfigError, ValueError, StorageError) as e:
        print(f"pipeline.resume: error: {e}", file=sys.stderr)
        return 2

    from pipeline.driver import start

    return start(cfg, args.run_dir, rounds, force=args.force, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
