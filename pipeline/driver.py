"""The single controller: for each round, rollouts -> export -> train policy -> train PPM -> evaluate.

Each phase is a named step function over a ``RoundContext`` (``pipeline.context``); the loop runs the phases of a
round in order and skips a phase whose completion marker exists (``RunDir.mark_done``), which is all that resume
needs. Ray actors do the heavy lifting inside phases (``pipeline.rollouts``); the loop itself holds no policy
logic. Which model each phase uses is ``rounds.schedule.Lineage``; the training phases are ``pipeline.training``,
the evaluation ``pipeline.evaluation``; the CLI around a stored run is ``pipeline.cli``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable

from pipeline.config import RunConfig, config_diff, dump_config
from pipeline.console import Console, duration, phase_summary
from pipeline.context import RoundContext, load_run_problems, prompt_fn, run_lineage
from pipeline.evaluation import evaluate_model, full_eval, phase_eval, round0_done, write_run_report
from pipeline.runlog import RunLog
from pipeline.storage import RunDir, StorageError
from pipeline.training import phase_train_policy, phase_train_ppm
from rounds.schedule import search_spec

# ----------------------------------------------------------------------------------------------- phases


def phase_rollouts(ctx: RoundContext) -> dict:
    from pipeline.rollouts import run_rollouts

    spec = ctx.spec
    lineage = ctx.lineage
    ppm = lineage.search_ppm(ctx.round_no)
    if spec.q_mode == "ppm" and ppm is None:
        # No earlier round produced a PPM (e.g. it had no preference pairs): search terminal-guided and say so.
        ctx.log.warning("no_ppm_for_search", round=ctx.round_no,
                        reason="no earlier round trained a PPM; this round's search is terminal-guided")
        spec = dataclasses.replace(spec, q_mode="terminal")
    policy = lineage.search_policy(ctx.round_no)
    searched = search_spec(ctx.cfg.rounds.schedule, spec,
                           policy_trained=lineage.newest_policy(ctx.round_no - 1) is not None)
    if searched != spec:
        ctx.log.warning("untrained_policy", round=ctx.round_no, mode=searched.gen_mode, few_shot=searched.few_shot,
                        reason="no earlier round fine-tuned the policy; it keeps the bootstrap round's prompt")
        spec = searched
    ctx.log.info("rollouts_start", round=ctx.round_no, policy=policy, ppm=ppm, problems=len(ctx.problems),
                 rollouts=spec.rollouts, children=spec.children, mode=spec.gen_mode,
                 unsolved_rollouts=list(spec.unsolved_rollouts))
    trees = ctx.run.trees(ctx.round_no)
    trees.collect_garbage()  # temp files of a killed run; their problems are simply redone
    trees.write_plan([p.id for p in ctx.problems])
    # Unsolved trees escalate through spec.unsolved_rollouts (round 4), inside the same call.
    stats = run_rollouts(ctx.cfg, ctx.round_no, spec, ctx.problems, policy, ppm, trees, ctx.log,
                         settings=ctx.cfg.rollouts, ship=ctx.run.ship)
    stored = trees.completed_problem_ids()
    solved = trees.solved_problem_ids()
    ctx.log.info("rollouts_done", round=ctx.round_no, stored=len(stored), solved=len(solved),
                 engine_utilisation=round(stats.engine_utilisation, 3), retries=stats.engine_retries,
                 worker_restarts=stats.worker_restarts)
    return {"stats": stats.to_dict(), "policy": policy, "ppm": ppm, "stored": len(stored), "solved": len(solved)}


def phase_export(ctx: RoundContext) -> dict:
    from pipeline.export import export_round

    # Prompts are rendered without few-shot examples: SFT teaches the format, so later rounds drop them.
    result = export_round(ctx.run, ctx.round_no, prompt_fn(ctx.cfg.engines.policy_model, few_shot=False),
                          extract_config=ctx.cfg.search.extract)
    ctx.log.info("export_done", round=ctx.round_no, **result.rows)
    return {"rows": result.rows, "summary": result.summary}


PHASES: list[tuple[str, Callable[[RoundContext], dict]]] = [
    ("rollouts", phase_rollouts),
    ("export", phase_export),
    ("train_policy", phase_train_policy),  # first: the PPM of this round starts from this policy (rStar-Math)
    ("train_ppm", phase_train_ppm),
    ("eval", phase_eval),
]


# ----------------------------------------------------------------------------------------------- the loop


def start(cfg: RunConfig, run_dir: str | None, rounds: list[int], force: bool = False, verbose: bool = False,
          console: Console | None = None) -> int:
    """Create or continue a run and execute ``rounds``, holding the run's lease throughout. Returns the exit status.

    ``force`` continues a run whose stored config differs, and takes over a lease gone stale (``pipeline.lease``).
    The console (``pipeline.console``; default: stdout) shows one live bar per phase and a line when it ends;
    what libraries print goes to RUN_DIR/libraries.log unless ``verbose``.
    """
    run = _open_run(cfg, run_dir, force)
    if run is None:
        return 2
    console = console or Console(verbose=verbose)
    try:
        return _drive(cfg, run, rounds, console)
    finally:
        run.lease.release()


def _drive(cfg: RunConfig, run: RunDir, rounds: list[int], console: Console) -> int:
    log = RunLog(run.log_path, console=console)
    log.info("run_start", run_dir=run.location, rounds=rounds, pid=os.getpid(), host=socket.gethostname())
    if run.lease.taken_over:
        old, why = run.lease.taken_over
        log.warning("lease_taken_over", holder_host=old.host, holder_pid=old.pid, holder_since=old.since, reason=why)
    repair_trees(run, rounds, log)
    if all(run.round_succeeded(r) for r in rounds) and run.report_path.is_file():
        print(f"{run.location}: rounds {rounds[0]}-{rounds[-1]} are already complete; nothing to do.", file=console.stream)
        print(run.report_path.read_text(), file=console.stream)
        return 0
    from pipeline.cluster import ResourceError, check_resources, connect

    console.line(f"run directory {run.location} (events: log.jsonl; library output: libraries.log)")
    with console.quiet_libraries(run.root / "libraries.log"):
        problems, eval_problems = load_run_problems(cfg, run, log)
        with connect(cfg.ray, log=log) as cluster:  # the process's one Ray connection; every phase uses it
            try:
                check_resources(cfg.ray, cluster, workers=min(cfg.ray.rollout_workers, max(1, len(problems))),
                                scorers=int(any(cfg.rounds.schedule[r - 1].q_mode == "ppm" for r in rounds)), log=log)
            except ResourceError as e:
                log.error("ray.resources", reason=str(e), action="exit 1")
                error = e
            else:
                error = None
                if cfg.eval.enabled and cfg.eval.base_model and not round0_done(run):
                    t = time.perf_counter()
                    info = evaluate_model(cfg, run, 0, run_lineage(cfg, run).bootstrap, None, eval_problems, log,
                                          full=full_eval(cfg, 0))
                    console.line(f"round 0 eval (the base model) done in {duration(time.perf_counter() - t)}: "
                                 f"{phase_summary('eval', info)}")
                for r in rounds:
                    ctx = RoundContext(cfg, run, r, log, _round_problems(cfg, r, problems), eval_problems, console)
                    run_round(ctx)
        table = write_run_report(run, log) if error is None else ""
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table, file=console.stream)
    print(f"\nrun directory: {run.location}", file=console.stream)
    return 0


def run_round(ctx: RoundContext) -> None:
    if ctx.run.round_succeeded(ctx.round_no):
        ctx.log.info("round_skip", round=ctx.round_no, reason="already complete")
        return
    t0 = time.perf_counter()
    for name, fn in PHASES:
        if ctx.run.is_done(ctx.round_no, name):
            ctx.log.info("phase_skip", round=ctx.round_no, phase=name, reason="marker present")
            continue
        if ctx.run.lease is not None:
            ctx.run.lease.check()  # another driver took the run over (--force on a lease it judged stale)
        ctx.log.info("phase_start", round=ctx.round_no, phase=name)
        t = time.perf_counter()
        info = fn(ctx)
        info["wall_s"] = round(time.perf_counter() - t, 2)
        ctx.run.mark_done(ctx.round_no, name, info)
        ctx.log.info("phase_done", round=ctx.round_no, phase=name, wall_s=info["wall_s"])
        if ctx.console is not None:
            ctx.console.line(f"round {ctx.round_no} {name.replace('_', ' ')} done in {duration(info['wall_s'])}: "
                             f"{phase_summary(name, info)}")
    ctx.run.mark_round_success(ctx.round_no, {"wall_s": round(time.perf_counter() - t0, 2)})


def repair_trees(run: RunDir, rounds: list[int], log: RunLog) -> dict[int, list[str]]:
    """Check every tree shard of ``rounds`` against its checksum; a damaged one is moved aside and its problems
    are redone: the round's rollouts and export run again. Returns {round: problem ids put back to pending}.

    The round's training and eval markers stay: the models were trained on exports made before the damage.
    """
    redo: dict[int, list[str]] = {}
    for r in rounds:
        for shard, why in run.trees(r).repair():
            log.warning("shard_damaged", round=r, file=str(run.trees_dir(r) / shard.file), reason=why,
                        problems=len(shard.problems), action="moved to trees/_corrupt/; its problems are redone")
            redo.setdefault(r, []).extend(shard.problems)
        if r in redo:
            for phase in ("rollouts", "export"):
                run.clear_done(r, phase)
            run.clear_round_success(r)
    return redo


# ----------------------------------------------------------------------------------------------- helpers


def _open_run(cfg: RunConfig, run_dir: str | None, force: bool) -> RunDir | None:
    """The run directory with its lease held by us, its config stored; None (after saying why) when refused."""
    text = dump_config(cfg)
    if run_dir is None:
        run = RunDir.fresh(cfg.storage.runs_dir, cfg.name)
        run.acquire_lease()  # a directory we just created: nobody else can hold it
        run.write_config(text)
        return run
    try:
        run = RunDir.open(run_dir)  # a path or a URI (s3://...: staged locally, pipeline.storage.remote)
        run.acquire_lease(force)
    except StorageError as e:  # LeaseHeld names the holder and what to do
        print(f"error: {e}", file=sys.stderr)
        return None
    if run.config_path.is_file():
        changes = config_diff(run.read_config(), cfg)
        if changes and not force:
            run.lease.release()
            print(f"error: {run.config_path} holds a different config; refusing to continue the run with:\n  "
                  + "\n  ".join(changes) + "\nrerun with --force to continue anyway, or use a new --run-dir",
                  file=sys.stderr)
            return None
        if changes:
            run.write_config(text)
        return run
    run.write_config(text)
    return run


def _round_problems(cfg: RunConfig, round_no: int, problems: list) -> list:
    n = cfg.rounds.schedule[round_no - 1].problems
    return problems[:n] if n else problems


__all__ = ["start", "run_round", "RoundContext", "PHASES", "repair_trees"]
