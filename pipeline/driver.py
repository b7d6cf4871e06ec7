"""The single controller: for each round, rollouts -> export -> train policy -> train PPM -> evaluate.

Each phase is a named step function over a ``RoundContext``; the loop runs the phases of a round in order and
skips a phase whose completion marker exists (``RunDir.mark_done``), which is all that resume needs. Ray actors
do the heavy lifting inside phases (``pipeline.rollouts``); the loop itself holds no policy logic.

Model lineage (every choice is config):
- the policy that searches round n is the bootstrap model in a 'bootstrap' round, else the newest policy trained
  before round n (round n-1's, or earlier if a round trained none); the PPM guiding a 'ppm' round likewise;
- training starts from the base weights each round (``training.from_base``, rStar-Math) or the newest policy;
- the PPM of round n starts from round n's fine-tuned policy (``training.ppm_init="policy"``, rStar-Math paper,
  training setup: the policy is trained first, then the PPM from it), or from the base PPM backbone (``"base"``);
- round 0 is the untrained bootstrap policy, evaluated for comparison.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, config_diff, dump_config
from pipeline.runlog import RunLog
from pipeline.storage import RunDir, StorageError, local_run_dir
from rounds.schedule import RoundSpec


@dataclass
class RoundContext:
    cfg: RunConfig
    run: RunDir
    round_no: int  # 1-based
    log: RunLog
    problems: list  # the round's training problems (data.Problem)
    eval_problems: list  # held-out, never trained on

    @property
    def spec(self) -> RoundSpec:
        return self.cfg.rounds.schedule[self.round_no - 1]

    @property
    def dir(self) -> Path:
        return self.run.round_dir(self.round_no)

    def bootstrap_model(self) -> str:
        return self.cfg.engines.bootstrap_model or self.cfg.engines.policy_model

    def newest_policy(self, upto: int) -> str | None:
        """The newest trained policy checkpoint of rounds 1..upto, None when none was trained."""
        for r in range(upto, 0, -1):
            if (self.run.policy_dir(r) / "config.json").is_file():
                return str(self.run.policy_dir(r))
        return None

    def newest_ppm(self, upto: int) -> str | None:
        for r in range(upto, 0, -1):
            if (self.run.ppm_dir(r) / "config.json").is_file():
                return str(self.run.ppm_dir(r))
        return None

    def search_policy(self) -> str:
        if self.spec.policy == "bootstrap":
            return self.bootstrap_model()
        return self.newest_policy(self.round_no - 1) or self.bootstrap_model()

    def ppm_backbone(self) -> str:
        """The model a new PPM head goes on: this round's fine-tuned policy (or the newest before it, or the base
        model when none was trained) under ``training.ppm_init="policy"``; the base PPM backbone under "base"."""
        if self.cfg.training.ppm_init == "policy":
            return self.newest_policy(self.round_no) or self.cfg.engines.policy_model
        return self.cfg.engines.ppm_model or self.cfg.engines.policy_model

    def search_ppm(self) -> str | None:
        return self.newest_ppm(self.round_no - 1) if self.spec.q_mode == "ppm" else None


# ----------------------------------------------------------------------------------------------- phases


def phase_rollouts(ctx: RoundContext) -> dict:
    from pipeline.rollouts import run_rollouts

    spec = ctx.spec
    ppm = ctx.search_ppm()
    if spec.q_mode == "ppm" and ppm is None:
        # No earlier round produced a PPM (e.g. it had no preference pairs): search terminal-guided and say so.
        ctx.log.warning("no_ppm_for_search", round=ctx.round_no,
                        reason="no earlier round trained a PPM; this round's search is terminal-guided")
        spec = dataclasses.replace(spec, q_mode="terminal")
    policy = ctx.search_policy()
    searched = search_spec(ctx.cfg, spec, policy_trained=ctx.newest_policy(ctx.round_no - 1) is not None)
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
                         settings=ctx.cfg.rollouts)
    stored = trees.completed_problem_ids()
    solved = trees.solved_problem_ids()
    ctx.log.info("rollouts_done", round=ctx.round_no, stored=len(stored), solved=len(solved),
                 engine_utilisation=round(stats.engine_utilisation, 3), retries=stats.engine_retries,
                 worker_restarts=stats.worker_restarts)
    return {"stats": stats.to_dict(), "policy": policy, "ppm": ppm, "stored": len(stored), "solved": len(solved)}


def phase_export(ctx: RoundContext) -> dict:
    from pipeline.export import export_round

    # Prompts are rendered without few-shot examples: SFT teaches the format, so later rounds drop them.
    result = export_round(ctx.run, ctx.round_no, _prompt_fn(ctx.cfg.engines.policy_model, few_shot=False),
                          extract_config=ctx.cfg.search.extract)
    ctx.log.info("export_done", round=ctx.round_no, **result.rows)
    return {"rows": result.rows, "summary": result.summary}


def phase_train_ppm(ctx: RoundContext) -> dict:
    from rounds.train_config import init_checkpoint
    from rounds.train_ppm import train_ppm

    if not ctx.spec.train_ppm:
        return {"skipped": "train_ppm is false for this round"}
    pairs = ctx.run.export_path(ctx.round_no, "ppm_pairs")
    n = _rows(pairs)
    if n < 2:
        ctx.log.warning("ppm_not_trained", round=ctx.round_no, pairs=n,
                        reason="fewer than 2 preference pairs: the search found no node with both a correct "
                               "and a wrong continuation")
        return {"skipped": f"{n} preference pairs"}
    # Runs after phase_train_policy, so under ppm_init="policy" the backbone is this round's fine-tuned policy.
    init = init_checkpoint(ctx.cfg.training, ctx.ppm_backbone(), ctx.newest_ppm(ctx.round_no - 1))
    result = _on_accelerators(ctx.cfg, train_ppm, init, pairs, ctx.run.ppm_dir(ctx.round_no), ctx.cfg.training)
    ctx.log.info("ppm_trained", round=ctx.round_no, loss=result.final_loss, steps=result.steps,
                 heldout_accuracy=result.pairwise_accuracy, heldout_pairs=result.heldout_pairs)
    return dataclasses.asdict(result) | {"out_dir": str(result.out_dir)}


def phase_train_policy(ctx: RoundContext) -> dict:
    from rounds.train_config import init_checkpoint
    from rounds.train_policy import train_policy

    if not ctx.spec.train_policy:
        return {"skipped": "train_policy is false for this round"}
    sft, data = policy_sft_data(ctx)
    n = data["rows"]
    if n == 0:
        ctx.log.warning("policy_not_trained", round=ctx.round_no,
                        reason="no correct trajectory was found, so there is no SFT data; the next round "
                               "keeps the current policy")
        return {"skipped": "0 SFT rows", "data": data}
    same = _same_data_round(ctx, data["digest"])
    if same is not None and ctx.cfg.training.from_base:
        # From the base weights on the same rows with the same seed: the same model as round `same`'s.
        ctx.log.info("policy_not_retrained", round=ctx.round_no, same_as_round=same,
                     reason="the SFT pool is unchanged since that round (no new correct trajectory)")
        return {"skipped": f"SFT data unchanged since round {same}", "same_as_round": same, "data": data}
    init = init_checkpoint(ctx.cfg.training, ctx.cfg.engines.policy_model, ctx.newest_policy(ctx.round_no - 1))
    result = _on_accelerators(ctx.cfg, train_policy, init, sft, ctx.run.policy_dir(ctx.round_no), ctx.cfg.training)
    ctx.log.info("policy_trained", round=ctx.round_no, loss=result.final_loss, steps=result.steps, rows=n,
                 problems=data["problems"], pooled=ctx.cfg.training.policy_pool)
    return dataclasses.asdict(result) | {"out_dir": str(result.out_dir), "data": data}


def policy_sft_data(ctx: RoundContext) -> tuple[Path, dict]:
    """round_N/sft_train.parquet: what the round's policy trains on (``rounds.sft_pool``): the best correct
    trajectories of every problem over rounds 1..N (``training.policy_pool``) or this round's only, with
    prompts as the trained policy will be searched with (``training.sft_prompt``)."""
    from rounds.sft_pool import build_sft_data

    t = ctx.cfg.training
    first = 1 if t.policy_pool else ctx.round_no
    paths = [ctx.run.export_path(r, "sft") for r in range(first, ctx.round_no + 1)]
    few_shot = _policy_settings(ctx.cfg, trained=True)[1] if t.sft_prompt == "search" else False
    out = ctx.dir / "sft_train.parquet"
    top_n = max(1, ctx.cfg.search.extract.sft_top_n)
    return out, build_sft_data(paths, out, top_n, _prompt_builder(ctx.cfg, few_shot).build)


def _same_data_round(ctx: RoundContext, digest: str) -> int | None:
    """The latest earlier round whose policy trained on exactly these rows, if its checkpoint exists."""
    for r in range(ctx.round_no - 1, 0, -1):
        info = (ctx.run.marker(r, "train_policy") or {}).get("info", {})
        trained = (ctx.run.policy_dir(r) / "config.json").is_file()
        if (info.get("data") or {}).get("digest") == digest:
            return r if trained else info.get("same_as_round")
        if trained:
            return None  # a policy on other data was trained since
    return None


def phase_eval(ctx: RoundContext) -> dict:
    if not ctx.cfg.eval.enabled:
        return {"skipped": "eval.enabled is false"}
    _write_metrics(ctx)
    solved = len(ctx.run.trees(ctx.round_no).solved_problem_ids())
    trained = ctx.newest_policy(ctx.round_no)
    policy = trained or ctx.bootstrap_model()
    ppm = ctx.newest_ppm(ctx.round_no)
    full = full_eval(ctx.cfg, ctx.round_no)
    same = _same_models_eval(ctx.run, ctx.round_no, {"policy": policy, "ppm": ppm}, full)
    if same is not None:
        # Nothing this round trained changed what is evaluated: the earlier numbers stand, re-measuring costs minutes.
        ctx.log.info("eval_reused", round=ctx.round_no, same_as_round=same,
                     reason="the policy and PPM are the ones an earlier round evaluated")
        return reuse_eval(ctx.run, ctx.round_no, same, (solved, len(ctx.problems)))
    return evaluate_model(ctx.cfg, ctx.run, ctx.round_no, policy, ppm, ctx.eval_problems,
                          ctx.log, trained=trained is not None, train_solved=(solved, len(ctx.problems)), full=full)


def full_eval(cfg: RunConfig, round_no: int) -> bool:
    """Whether ``round_no`` gets maj@k and the PPM metrics besides greedy pass@1 (``eval.full_rounds``)."""
    return cfg.eval.full_rounds is None or round_no in cfg.eval.full_rounds


def _same_models_eval(run: RunDir, round_no: int, models: dict, full: bool) -> int | None:
    """The previous evaluated round when it evaluated exactly ``models`` (and fully, if this round is full)."""
    from rounds.report import read_json

    for r in range(round_no - 1, -1, -1):
        ev, _ = read_json(run.root / f"round_{r}" / "eval.json")
        if ev is None:
            continue
        if ev.get("models") == models and (ev.get("full", True) or not full):
            return ev.get("same_as_round", r)
        return None
    return None


def reuse_eval(run: RunDir, round_no: int, same: int, train_solved: tuple[int, int]) -> dict:
    """round_N/eval.json as a copy of round ``same``'s held-out numbers, with this round's own search coverage."""
    from rounds.report import read_json, write_json_atomic

    ev, reason = read_json(run.root / f"round_{same}" / "eval.json")
    if ev is None:
        raise RuntimeError(f"round {round_no}: cannot reuse round {same}'s evaluation ({reason})")
    solved, n = train_solved
    ev = dict(ev, round=round_no, same_as_round=same)
    ev["metrics"] = dict(ev["metrics"], train_solved=solved / n if n else None)
    ev["counts"] = dict(ev.get("counts") or {})
    ev["skipped"] = dict(ev.get("skipped") or {})
    if n:
        ev["counts"]["train"] = {"solved": solved, "problems": n}
        ev["skipped"].pop("train_solved", None)
    write_json_atomic(run.root / f"round_{round_no}" / "eval.json", ev)
    return {"metrics": ev["metrics"], "skipped": ev["skipped"], "same_as_round": same}


PHASES: list[tuple[str, Callable[[RoundContext], dict]]] = [
    ("rollouts", phase_rollouts),
    ("export", phase_export),
    ("train_policy", phase_train_policy),  # first: the PPM of this round starts from this policy (rStar-Math)
    ("train_ppm", phase_train_ppm),
    ("eval", phase_eval),
]


# ----------------------------------------------------------------------------------------------- the loop


def start(cfg: RunConfig, run_dir: str | None, rounds: list[int], force: bool = False) -> int:
    """Create or continue a run and execute ``rounds``, holding the run's lease throughout. Returns the exit status.

    ``force`` continues a run whose stored config differs, and takes over a lease gone stale (``pipeline.lease``).
    """
    run = _open_run(cfg, run_dir, force)
    if run is None:
        return 2
    try:
        return _drive(cfg, run, rounds)
    finally:
        run.lease.release()


def _drive(cfg: RunConfig, run: RunDir, rounds: list[int]) -> int:
    log = RunLog(run.log_path)
    log.info("run_start", run_dir=str(run.root), rounds=rounds, pid=os.getpid(), host=socket.gethostname())
    if run.lease.taken_over:
        old, why = run.lease.taken_over
        log.warning("lease_taken_over", holder_host=old.host, holder_pid=old.pid, holder_since=old.since, reason=why)
    repair_trees(run, rounds, log)
    if all(run.round_succeeded(r) for r in rounds) and run.report_path.is_file():
        print(f"{run.root}: rounds {rounds[0]}-{rounds[-1]} are already complete; nothing to do.")
        print(run.report_path.read_text())
        return 0
    from pipeline.cluster import ResourceError, check_resources, connect

    problems, eval_problems = _load_problems(cfg, run, log)
    with connect(cfg.ray, log=log) as cluster:  # the process's one Ray connection; every phase uses it
        try:
            check_resources(cfg.ray, cluster, workers=min(cfg.ray.rollout_workers, max(1, len(problems))),
                            scorers=int(any(cfg.rounds.schedule[r - 1].q_mode == "ppm" for r in rounds)), log=log)
        except ResourceError as e:
            log.error("ray.resources", reason=str(e))
            print(f"error: {e}", file=sys.stderr)
            return 1
        if cfg.eval.enabled and cfg.eval.base_model and not _round0_done(run):
            evaluate_model(cfg, run, 0, _bootstrap(cfg), None, eval_problems, log, full=full_eval(cfg, 0))
        for r in rounds:
            ctx = RoundContext(cfg, run, r, log, _round_problems(cfg, r, problems), eval_problems)
            run_round(ctx)
    table = _report(run, log)
    print(table)
    print(f"\nrun directory: {run.root}")
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
            run.success_path(r).unlink(missing_ok=True)
    return redo


# ----------------------------------------------------------------------------------------------- helpers


def _bootstrap(cfg: RunConfig) -> str:
    return cfg.engines.bootstrap_model or cfg.engines.policy_model


def _open_run(cfg: RunConfig, run_dir: str | None, force: bool) -> RunDir | None:
    """The run directory with its lease held by us, its config stored; None (after saying why) when refused."""
    text = dump_config(cfg)
    if run_dir is None:
        run = RunDir.fresh(cfg.storage.runs_dir, cfg.name)
        run.acquire_lease()  # a directory we just created: nobody else can hold it
        run.write_config(text)
        return run
    try:
        run = RunDir(local_run_dir(run_dir))
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


def _load_problems(cfg: RunConfig, run: RunDir, log: RunLog) -> tuple[list, list]:
    from data import load_problems_config

    train, held_out = load_problems_config(cfg.problems, rejected_dir=run.root)
    log.info("problems_loaded", train=len(train), held_out=len(held_out), source=cfg.problems.source)
    return train, held_out


def _round_problems(cfg: RunConfig, round_no: int, problems: list) -> list:
    n = cfg.rounds.schedule[round_no - 1].problems
    return problems[:n] if n else problems


def _rows(path: Path) -> int:
    if not path.is_file():
        return 0
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _prompt_builder(cfg: RunConfig, few_shot: bool):
    from pipeline.engines import prompt_builder

    return prompt_builder(cfg.engines.policy_model, few_shot=few_shot, n_examples=cfg.engines.few_shot_examples,
                          cache_dir=_cache_dir(cfg))


def _prompt_fn(model: str, few_shot: bool) -> Callable[[str, str], str]:
    from pipeline.engines import prompt_builder

    return prompt_builder(model, few_shot=few_shot).build


def _on_accelerators(cfg: RunConfig, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a training or evaluation function where the accelerators are: in-process on a CPU-only run, as a Ray
    task with a GPU otherwise (the driver of a cluster job usually sits on a CPU-only head node)."""
    gpus = cfg.ray.gpus_per_engine
    if not gpus:
        return fn(*args, **kwargs)
    import ray

    return ray.get(ray.remote(num_gpus=max(1.0, gpus), num_cpus=1)(fn).remote(*args, **kwargs))


def _round0_done(run: RunDir) -> bool:
    return (run.root / "round_0" / "eval.json").is_file()


def search_spec(cfg: RunConfig, spec: RoundSpec, policy_trained: bool) -> RoundSpec:
    """``spec`` as the round searches with it. A round that continues the previous policy when no earlier round
    fine-tuned one (none found a correct trajectory) searches with the bootstrap round's generation mode and
    few-shot examples: the model has not learned the step format, and without them it rarely writes it."""
    if spec.policy != "previous" or policy_trained:
        return spec
    mode, few_shot = _policy_settings(cfg, trained=False)
    return dataclasses.replace(spec, gen_mode=mode, few_shot=few_shot)


def _policy_settings(cfg: RunConfig, trained: bool) -> tuple[str, bool]:
    """(generation mode, few-shot) a policy is used with: the bootstrap round's settings for an untrained
    model, the later rounds' for an SFT policy (it learned the step format, so no few-shot examples)."""
    spec = cfg.rounds.schedule[min(1, cfg.rounds.count - 1)] if trained else cfg.rounds.schedule[0]
    return spec.gen_mode, spec.few_shot


def evaluate_model(cfg: RunConfig, run: RunDir, round_no: int, policy: str, ppm: str | None, problems: list,
                   log: RunLog, trained: bool = False, train_solved: tuple[int, int] | None = None,
                   full: bool = True, out_dir: Path | None = None) -> dict:
    """Evaluate one policy (+ PPM) on ``problems``; writes eval.json into ``out_dir`` (default round_N/; round 0 =
    the base model). ``full`` False: greedy pass@1 only."""
    out_dir = out_dir if out_dir is not None else run.root / f"round_{round_no}"
    args = (cfg, out_dir, round_no, policy, ppm, problems, trained, train_solved, full)
    log.info("eval_start", round=round_no, policy=policy, ppm=ppm, problems=len(problems))
    # Progress lines reach the run log only in-process; a Ray task's output goes to the job log instead.
    say = None if cfg.ray.gpus_per_engine else (lambda msg: log.info("eval_progress", message=msg))
    result = _on_accelerators(cfg, _evaluate, *args, say=say)
    log.info("eval_done", round=round_no, **{k: v for k, v in result["metrics"].items() if v is not None})
    return {"metrics": result["metrics"], "skipped": result.get("skipped", {}), "counts": result.get("counts", {}),
            "n": result.get("n_problems")}


def _evaluate(cfg: RunConfig, out_dir: Path, round_no: int, policy: str, ppm: str | None, problems: list,
              trained: bool, train_solved: tuple[int, int] | None, full: bool = True,
              say: Callable[[str], None] | None = None) -> dict:
    import data
    from pipeline.engines import make_policy, make_scorer, with_generation
    from pipeline.sandbox import SandboxPool
    from rounds.evaluate import TrainSolved, evaluate

    mode, few_shot = _policy_settings(cfg, trained)
    cache = _cache_dir(cfg)
    greedy_gen = dataclasses.replace(cfg.engines.generation, temperature=0.0)
    sampler = make_policy(cfg.engines, model=policy, mode=mode, few_shot=few_shot, seed=cfg.seed, cache_dir=cache)
    greedy = with_generation(sampler, greedy_gen)  # the same loaded model, decoding greedily
    scorer = make_scorer(cfg.engines, ppm) if ppm else None
    solved = TrainSolved(*train_solved) if train_solved and train_solved[1] else None
    with SandboxPool(cfg.sandbox) as pool:
        return evaluate(problems, round_index=round_no, greedy=greedy, sampler=sampler, executor=pool,
                        grade=data.grade, equivalent=data.is_equivalent, scorer=scorer, params=cfg.eval,
                        search=cfg.search, seed=cfg.seed, train_solved=solved,
                        no_ppm_reason=None if ppm else "no PPM trained yet at this round",
                        no_train_reason="round 0 is the base model: no search of its own" if round_no == 0 else None,
                        greedy_only_reason=None if full else f"greedy only at round {round_no} (eval.full_rounds="
                                                             f"{cfg.eval.full_rounds})",
                        models={"policy": policy, "ppm": ppm}, out_dir=out_dir, log=say)


def _cache_dir(cfg: RunConfig) -> Path | None:
    return Path(cfg.storage.cache_dir).expanduser() if cfg.storage.cache_dir else None


def _write_metrics(ctx: RoundContext) -> None:
    """round_N/metrics.json: the training figures the report shows beside the eval numbers."""
    from rounds.report import update_metrics

    ppm = (ctx.run.marker(ctx.round_no, "train_ppm") or {}).get("info", {})
    pol = (ctx.run.marker(ctx.round_no, "train_policy") or {}).get("info", {})
    export = (ctx.run.marker(ctx.round_no, "export") or {}).get("info", {}).get("rows", {})
    # pairwise_accuracy is -1.0 when no pair was held out: that is "not measured", never a figure to show.
    acc = ppm.get("pairwise_accuracy") if ppm.get("heldout_pairs") else None
    solved, searched = train_coverage(ctx.run, ctx.round_no)
    update_metrics(ctx.dir, ppm_pairwise_acc=acc, ppm_heldout_pairs=ppm.get("heldout_pairs"),
                   sft_final_loss=pol.get("final_loss"), ppm_pairs=export.get("ppm_pairs"),
                   # the rows the policy trained on: the pool over rounds so far (this round's export without one)
                   sft_rows=(pol.get("data") or {}).get("rows", export.get("sft")),
                   coverage_solved=solved, coverage_problems=searched)


def train_coverage(run: RunDir, upto: int) -> tuple[int, int]:
    """(training problems with a correct trajectory in any of rounds 1..upto, problems searched in any of them).
    A union over rounds, so it never falls: a problem solved once stays in the policy's SFT pool."""
    solved: set[str] = set()
    searched: set[str] = set()
    for r in range(1, upto + 1):
        trees = run.trees(r)
        solved |= trees.solved_problem_ids()
        searched |= trees.completed_problem_ids()
    return len(solved), len(searched)


def _report(run: RunDir, log: RunLog) -> str:
    from rounds.report import write_report

    rounds = sorted({0, *run.rounds()}) if _round0_done(run) else run.rounds()
    table = write_report(run.root, rounds)
    log.info("report_written", path=str(run.report_path))
    return table


def _stored_run(run_dir: Path) -> tuple[RunConfig, RunDir]:
    from pipeline.config import load_config

    run = RunDir(run_dir)
    return load_config(run.config_path if run.config_path.is_file() else run_dir / "config.yaml"), run


def export_round_cli(run_dir: Path, round_no: int, out: Path | None) -> int:
    """``python -m pipeline export``: (re)write a round's four parquet files from its stored trees."""
    from pipeline.export import export_round

    cfg, run = _stored_run(run_dir)
    if not run.trees(round_no).completed_problem_ids():
        print(f"error: {run.trees_dir(round_no)}: no completed trees for round {round_no}", file=sys.stderr)
        return 2
    try:
        result = export_round(run, round_no, _prompt_fn(cfg.engines.policy_model, few_shot=False), out_dir=out,
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
    from rounds.report import fraction_text

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        print(f"error: {run_dir}: not a run directory (no config.yaml); pass the directory a run wrote",
              file=sys.stderr)
        return 2
    if round_no < 0:
        print(f"error: --round {round_no}: must be >= 0 (0 = the base model)", file=sys.stderr)
        return 2
    cfg, run = _stored_run(run_dir)
    log = RunLog(run.log_path)
    if problems_file is None:
        _, problems = _load_problems(cfg, run, log)
        out_dir = None
    else:
        problems, error = _problems_file(problems_file)
        if error:
            print(f"error: --problems {problems_file}: {error}", file=sys.stderr)
            return 2
        out_dir = run.root / f"round_{round_no}" / f"eval_{Path(problems_file).stem}"
    ctx = RoundContext(cfg, run, max(round_no, 1), log, [], problems)
    trained = ctx.newest_policy(round_no) if round_no else None
    if round_no and trained is None and not run.round_dir(round_no).is_dir():
        print(f"error: {run_dir}: round {round_no} was never run; rounds present: {run.rounds()}", file=sys.stderr)
        return 2
    policy = trained or ctx.bootstrap_model()
    ppm = ctx.newest_ppm(round_no) if round_no else None
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


def _problems_file(path: Path) -> tuple[list, str | None]:
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


__all__ = ["start", "run_round", "RoundContext", "PHASES", "evaluate_model"]
