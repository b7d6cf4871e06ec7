"""Why the engines compute on one thread per process (pipeline/engines/compute.py): a decode step of the embedded
model on the only thread that has computed, against the same step on a second thread after the first computed.

    .venv/bin/python bench/bench_compute_thread.py                # bf16, 64 rows over 300 tokens of KV
    .venv/bin/python bench/bench_compute_thread.py --dtype float32 --rows 8

Each case runs in a fresh process (an OpenMP team, once made, lives as long as its thread), best of
``--repeats`` steps. Voluntary context switches of the computing thread (``getrusage(RUSAGE_THREAD)``) show
the cause: a throttled libgomp sleeps at its barriers instead of spinning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    "one thread": "the main thread decodes; no other thread has computed",
    "second thread": "the main thread decodes once, then a second thread decodes (the engines before 2026-12-02)",
    "compute thread": "the main thread only loads the model; pipeline.engines.compute's thread decodes",
}


def _child(case: str, dtype: str, rows: int, context: int, repeats: int) -> dict:
    import resource
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.engines import compute, fastpath
    from rounds.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model("embedded:smollm2-135m")),
                                                 dtype=getattr(torch, dtype)).eval()

    def measure() -> dict:
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        step = fastpath.time_decode_step(model, rows, context=context, steps=repeats)
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        return {"step_ms": step * 1e3, "switches": r1.ru_nvcsw - r0.ru_nvcsw}

    if case == "one thread":
        return measure()
    if case == "compute thread":
        return compute.run(measure)
    measure()  # the main thread computes: its OpenMP team now lives as long as it does
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(measure()))
    t.start()
    t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=300, help="tokens of KV each row attends to")
    ap.add_argument("--repeats", type=int, default=6, help="decode steps per case (best kept)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.dtype, args.rows, args.context, args.repeats)))
        return
    print(f"embedded SmolLM2-135M, {args.dtype}, {args.rows} rows over {args.context} tokens: one decode step")
    results = {}
    for case, what in CASES.items():
        out = subprocess.run([sys.executable, __file__, "--child", case, "--dtype", args.dtype, "--rows",
                              str(args.rows), "--context", str(args.context), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[case]
        print(f"  {case:<15} {r['step_ms']:7.1f} ms  {r['switches']:6d} voluntary switches  ({what})", flush=True)
    one = results["one thread"]["step_ms"]
    print(f"second thread / one thread = {results['second thread']['step_ms'] / one:.2f}x; "
          f"compute thread / one thread = {results['compute thread']['step_ms'] / one:.2f}x")


if __name__ == "__main__":
    main()
