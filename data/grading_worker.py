"""The grading worker process: ``python -m data.grading_worker`` (started by ``data.grading_pool``).

Protocol, one JSON object per line: the worker first writes ``{"ready": true}`` once math-verify
and sympy are imported and warm (or ``{"fatal": "..."}`` if they cannot be), then for every
``{"i": n, "p": prediction, "r": reference}`` on stdin answers ``{"i": n, "eq": bool, "why": str}``.
It never enforces time itself: the parent kills it at the deadline. Memory is capped with
RLIMIT_AS so a runaway sympy computation ends in MemoryError (a recorded "not equal") or death.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data.equivalence import Verdict, symbolic_compare


def _limit_memory(memory_mb: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX: the parent's wall-clock bound still applies
        return
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(memory_mb: int) -> None:
    import logging

    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        _limit_memory(memory_mb)
        # math-verify warns once that its (signal) timeouts are off: here that is by design.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        symbolic_compare("\\frac{1}{2}", "0.5")  # import and warm everything before saying ready
    except Exception as exc:  # reported to the parent, which raises GradingWorkerError with it
        channel.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            verdict = symbolic_compare(msg["p"], msg["r"])
        except (MemoryError, RecursionError) as exc:
            verdict = Verdict(False, f"comparison ran out of {'memory' if isinstance(exc, MemoryError) else 'stack'}")
        except Exception as exc:  # a library bug on odd input is a recorded "not equal", never a crash
            verdict = Verdict(False, f"comparison failed: {type(exc).__name__}: {str(exc)[:200]}")
        channel.write(json.dumps({"i": msg["i"], "eq": verdict.equal, "why": verdict.reason}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A grading worker (started by data.grading_pool.WorkerPool).")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address-space limit of this process")
    args = parser.parse_args(argv)
    serve(args.memory_mb)


if __name__ == "__main__":
    main()
