"""A one-page summary of a run directory: ``python -m pipeline info RUN_DIR`` prints ``info(RUN_DIR)``.

It reads only small files (config.yaml, manifests, markers, parquet footers, eval.json, the log's tail), so it
is instant on a large run and safe to call while the run is writing. A damaged part of the directory is shown
as an ``error:`` line in its place rather than hiding the rest of the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.runlog import format_event, read_log
from pipeline.storage import EXPORT_TABLES, PHASES, RunDir, StorageError
from rounds.behaviour_report import PLOT_FILE as BEHAVIOUR_PLOT
from rounds.behaviour_report import behaviour_lines

_WIDTH = 110  # a summary line longer than this is cut with '...'
_LOG_WIDTH = 170  # log lines carry counters and rates at the end: keep more of them
_CONFIG_SECTIONS = ("problems", "engines", "search", "sandbox", "training", "ray")


def _cut(text: str, width: int = _WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalars(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a nested mapping as (dotted key, value); lists are summarised by their length."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _scalars(v, key + ".")
        elif isinstance(v, list):
            out.append((key, f"[{len(v)} items]"))
        else:
            out.append((key, v))
    return out


def _config_lines(config: dict) -> list[str]:
    lines = [f"name: {config.get('name', '?')}   seed: {config.get('seed', '?')}"]
    for section in _CONFIG_SECTIONS:
        body = config.get(section)
        if isinstance(body, dict) and body:
            lines.append(_cut(f"  {section}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in _scalars(body))))
    return lines


def _schedule(config: dict) -> list[dict]:
    rounds = config.get("rounds")
    sched = rounds.get("schedule") if isinstance(rounds, dict) else None
    return [s for s in sched if isinstance(s, dict)] if isinstance(sched, list) else []


def _spec_line(spec: dict) -> str:
    stages = spec.get("unsolved_rollouts")
    extra = f" (unsolved: {', '.join(str(n) for n in stages)})" if stages else ""
    return (f"spec: policy={spec.get('policy')} q={spec.get('q_mode')} gen={spec.get('gen_mode')} "
            f"rollouts={spec.get('rollouts')}{extra} children={spec.get('children')}")


def _problems_line(run: RunDir, rnd: int) -> list[str]:
    store = run.trees(rnd)
    shards = store.shards()
    done = sum(len(s.problems) for s in shards)
    solved = sum(len(s.solved) for s in shards)
    nodes = sum(s.rows for s in shards)
    plan = store.plan()
    total = "?" if plan is None else str(len(plan))
    rate = f"{solved / done:.1%}" if done else "-"
    lines = [f"problems: {done}/{total} done, {solved} solved (solve rate {rate}), "
             f"{len(shards)} shards, {nodes} nodes"]
    if store.dir.is_dir():
        listed = {s.file for s in shards}
        stray = [p.name for p in store.dir.iterdir()
                 if p.name.startswith(".tmp-") or (p.name.startswith("part-") and p.name not in listed)]
        if stray:
            lines.append(f"  {len(stray)} uncommitted file(s) in trees/ (a crash's leftovers; removed on resume)")
    return lines


def _exports_line(run: RunDir, rnd: int) -> str:
    import pyarrow.parquet as pq

    parts = []
    for table in EXPORT_TABLES:
        path = run.export_path(rnd, table)
        if path.is_file():
            try:
                parts.append(f"{table}={pq.read_metadata(path).num_rows}")
            except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a bad footer
                parts.append(f"{table}=unreadable ({type(e).__name__})")
    return "exports: " + (", ".join(parts) + " rows" if parts else "none")


def _checkpoint_state(path: Path) -> str:
    if (path / "config.json").is_file():
        return "yes"
    return "incomplete" if path.exists() else "no"


def _eval_line(run: RunDir, rnd: int) -> str | None:
    results = run.read_eval(rnd)
    if results is None:
        return None
    nums = [(k, v) for k, v in _scalars(results) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return _cut("eval: " + (", ".join(f"{k}={_fmt(v)}" for k, v in nums) if nums else "(no figures)"))


def _round_block(run: RunDir, rnd: int, spec: dict | None) -> list[str]:
    phases = run.phases_done(rnd)
    status = "done" if run.round_succeeded(rnd) else ("in progress" if phases or run.round_dir(rnd).exists()
                                                      else "not started")
    lines = [f"round {rnd}: {status}"]
    body: list[str] = []
    if spec is not None:
        body.append(_spec_line(spec))
    if status == "not started":
        return lines + ["  " + b for b in body]
    body.append("phases: " + " ".join(f"{p}={'done' if p in phases else '-'}" for p in PHASES))
    for name, fn in (("problems", _problems_line), ("exports", _exports_line)):
        try:
            got = fn(run, rnd)
            body += got if isinstance(got, list) else [got]
        except StorageError as e:
            body.append(f"error ({name}): {e}")
    body += behaviour_lines(run.round_dir(rnd))  # rounds.behaviour_report: from behaviours.json
    body.append(f"checkpoints: policy={_checkpoint_state(run.policy_dir(rnd))} "
                f"ppm={_checkpoint_state(run.ppm_dir(rnd))}")
    try:
        ev = _eval_line(run, rnd)
    except StorageError as e:
        ev = f"error (eval): {e}"
    if ev:
        body.append(ev)
    # Error lines are kept whole: the path and the advice are the point of them.
    return lines + ["  " + b if b.startswith("error") else _cut("  " + b) for b in body]


def _lease_line(run: RunDir) -> str:
    """Who drives the run now, from its lease (``pipeline.lease``)."""
    import time

    from pipeline.lease import RunLease

    lease = RunLease(run.root)
    try:
        holder = lease.holder()
    except StorageError as e:
        return f"error (lease): {e}"
    if holder is None:
        return "lease: free (no driver holds this run)"
    why = lease.stale_reason(holder)
    return f"lease: held by {holder.describe(time.time())}" + (f"; stale: {why}" if why else "")


def info(run_dir: str | Path, log_lines: int = 8, name: str | None = None) -> str:
    """The summary page of ``run_dir`` (see module doc); raises StorageError if it is not a run directory.

    ``name``: how to call the run in the page (its URI when ``run_dir`` is a local copy of an object-store run)."""
    import yaml

    run = RunDir(run_dir)
    text = run.read_config()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise StorageError(f"{run.config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise StorageError(f"{run.config_path}: expected a mapping of config sections")
    schedule = _schedule(config)
    present = run.rounds()
    count = max(len(schedule), *present) if present else len(schedule)
    finished = sum(run.round_succeeded(r) for r in range(1, count + 1))

    out = [f"run {name or run.root}  ({finished}/{count} rounds done)", _lease_line(run)]
    out += _config_lines(config)
    for rnd in range(1, count + 1):
        out.append("")
        out += _round_block(run, rnd, schedule[rnd - 1] if rnd <= len(schedule) else None)
    out.append("")
    out.append("report: " + ", ".join(f"{p.name}={'yes' if p.is_file() else 'no'}"
                                      for p in (run.report_path, run.plot_path)))
    if (run.root / BEHAVIOUR_PLOT).is_file():
        out.append(f"behaviour plot: {run.root / BEHAVIOUR_PLOT} (correct vs wrong trajectories per round)")
    errors = read_log(run.log_path, last=3, min_level="warning")
    if errors:
        out.append("last warnings/errors:")
        out += [_cut("  " + format_event(r), _LOG_WIDTH) for r in errors]
    tail = read_log(run.log_path, last=log_lines)
    out.append(f"last log lines ({run.log_path.name}):" if tail else f"log: no events in {run.log_path.name}")
    out += [_cut("  " + format_event(r), _LOG_WIDTH) for r in tail]
    return "\n".join(out)


__all__ = ["info"]
