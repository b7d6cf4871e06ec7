"""Part (d) of the GPU check: one tiny round end to end, through Ray when it is installed, else in-process.

With Ray this is the product's own path: ``pipeline.driver.start`` on ``configs/tiny.yaml`` (rounds 1..1).

Without Ray (the GPU machine: Ray's wheels are ~76 MiB, over the carry limit) there is no in-process rollout
phase in the pipeline: ``pipeline.rollouts.run_rollouts`` always runs the search in Ray actors. So this module runs
the round's phases directly: the rollout phase is replaced by the same search a rollout worker runs
(``mcts.search.TreeSearch`` per problem, driven in waves by ``mcts.wave.run_search``, on the backends
``pipeline.rollouts.default_backends`` builds: the configured policy engine, the sandbox pool, ``data.grade``),
with every finished tree committed through the round's ``TreeStore`` writer as the driver does; then the driver's
own phase functions run unchanged: export, PPM training, policy training, evaluation (in-process, since
``ray.gpus_per_engine`` is 0), each marked done, then the round's ``_SUCCESS``. Tree groups, engine actors,
retries and worker restarts are Ray's business and are not exercised here.

The round's policy is the SFT checkpoint of part (b) when there is one (it was trained on these problems'
solutions, so the search has a chance to find correct ones and the training phases get data); otherwise the
tiny random model, whose round usually solves nothing, and the training phases then record why they skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def round_config(device: str, runs_dir: Path, bootstrap: Path, use_ray: bool):
    from pipeline.config import load_config

    overrides = [
        f"storage.runs_dir={runs_dir}",
        "engines.policy_model=tiny-random",
        f"engines.bootstrap_model={bootstrap}",
        f"engines.device={device}",
        f"training.device={device}",
        f"training.precision={'bf16' if device == 'cuda' else 'fp32'}",
        # The bootstrap here is an SFT policy trained on prompts without examples: search it that way.
        "rounds.schedule.0.few_shot=false",
        "eval.base_model=false",
    ]
    if device == "cpu":
        # --cpu: the same phases, small enough for seconds on a loaded 2-core machine.
        overrides += ["problems.n=2", "problems.eval_n=1", "rounds.schedule.0.rollouts=1",
                      "rounds.schedule.0.children=2", "engines.generation.max_new_tokens_solution=24",
                      "engines.generation.max_new_tokens_step=16", "eval.maj_k=1", "eval.best_of_n=1",
                      "sandbox.timeout=2"]
    if use_ray and device == "cuda":
        # Ray hides the GPU from an actor that reserves none: give the engines and scorer a share of the one GPU.
        overrides += ["ray.gpus_per_engine=0.5", "ray.gpus_per_scorer=0.25"]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def phase_rollouts_in_process(ctx) -> dict:
    """The rollout phase without Ray: see the module doc. Returns the phase's marker info."""
    from mcts.search import TreeSearch
    from mcts.seeds import tree_seed
    from mcts.serialize import trees_to_table
    from mcts.wave import run_search
    from pipeline.rollouts import default_backends, round_search_config
    from rounds.schedule import search_spec

    cfg, spec = ctx.cfg, ctx.spec
    lineage = ctx.lineage
    ppm = lineage.search_ppm(ctx.round_no)
    if spec.q_mode == "ppm" and ppm is None:
        spec = dataclasses.replace(spec, q_mode="terminal")  # as phase_rollouts does without an earlier PPM
    policy_model = lineage.search_policy(ctx.round_no)
    spec = search_spec(cfg.rounds.schedule, spec, policy_trained=lineage.newest_policy(ctx.round_no - 1) is not None)
    trees = ctx.run.trees(ctx.round_no)
    trees.collect_garbage()
    trees.write_plan([p.id for p in ctx.problems])
    done_before = trees.completed_problem_ids()
    todo = [p for p in ctx.problems if str(p.id) not in done_before]
    backends = default_backends(cfg, spec, policy_model, ppm)
    policy = backends.policy()
    scorer = backends.scorer() if backends.scorer is not None else None
    search_cfg = round_search_config(cfg, spec)
    searches = [TreeSearch(p, search_cfg, tree_seed(cfg.seed, ctx.round_no, str(p.id)), backends.grader,
                           round_index=ctx.round_no) for p in todo]
    solved = 0
    t0 = time.perf_counter()
    with backends.executor() as executor, trees.writer(cfg.storage.shard_problems) as writer:

        def store(search) -> None:
            nonlocal solved
            ok = any(n.verdict == "correct" for n in search.tree.terminals())
            solved += ok
            writer.append(search.tree_id, trees_to_table([search.tree]), solved=ok)

        run_search(searches, policy, executor, scorer, on_done=store)
    ctx.log.info("rollouts_done", round=ctx.round_no, stored=len(trees.completed_problem_ids()), solved=solved,
                 path="in-process (no Ray)")
    stats = getattr(policy, "stats", None)  # the transformers engine counts its tokens; other backends may not
    return {"path": "in-process", "policy": policy_model, "ppm": ppm, "problems": len(todo), "solved": solved,
            "stored": len(trees.completed_problem_ids()), "engine_device": str(getattr(policy, "device", "")),
            "new_tokens": stats.new_tokens if stats is not None else None,
            "search_s": round(time.perf_counter() - t0, 2)}


def run_round_in_process(cfg, run_dir: Path, round_no: int = 1) -> None:
    """``pipeline.driver.run_round`` for one round with the rollout phase swapped for the in-process one."""
    from data import load_problems_config
    from pipeline.config import dump_config
    from pipeline.driver import PHASES, RoundContext
    from pipeline.runlog import RunLog
    from pipeline.storage import RunDir

    run = RunDir(run_dir)
    run.write_config(dump_config(cfg))
    log = RunLog(run.log_path)
    train, held_out = load_problems_config(cfg.problems, rejected_dir=run.root)
    n = cfg.rounds.schedule[round_no - 1].problems  # 0 = all
    ctx = RoundContext(cfg, run, round_no, log, train[:n] if n else train, held_out)
    t0 = time.perf_counter()
    for name, fn in PHASES:
        fn = phase_rollouts_in_process if name == "rollouts" else fn
        if run.is_done(round_no, name):
            continue
        t = time.perf_counter()
        info = fn(ctx)
        info["wall_s"] = round(time.perf_counter() - t, 2)
        run.mark_done(round_no, name, info)
    run.mark_round_success(round_no, {"wall_s": round(time.perf_counter() - t0, 2)})


def run_tiny_round(device: str, work: Path, tiny: Path, use_ray: bool, bootstrap: Path | None = None) -> dict:
    """Run round 1 of the tiny preset; returns what each phase recorded. Raises when the round did not succeed."""
    from pipeline.storage import RunDir

    work.mkdir(parents=True, exist_ok=True)
    policy = bootstrap if bootstrap is not None and (bootstrap / "config.json").is_file() else tiny
    cfg = round_config(device, work / "runs", policy, use_ray)
    run_dir = work / "runs" / "tiny-round"
    if use_ray:
        from pipeline.driver import start

        status = start(cfg, str(run_dir), [1])
        if status != 0:
            raise RuntimeError(f"pipeline.driver.start returned exit status {status}; see {run_dir}/log.jsonl")
    else:
        run_round_in_process(cfg, run_dir)
    run = RunDir(run_dir)
    if not run.round_succeeded(1):
        raise AssertionError(f"{run_dir}: round 1 has no _SUCCESS marker")
    phases = {}
    for name in ("rollouts", "export", "train_ppm", "train_policy", "eval"):
        info = (run.marker(1, name) or {}).get("info", {})
        keep = ("path", "solved", "stored", "engine_device", "new_tokens", "rows", "skipped", "steps", "final_loss",
                "wall_s", "metrics", "policy")
        phases[name] = {k: v for k, v in info.items() if k in keep}
    return {"path": "ray (pipeline.driver.start)" if use_ray else "in-process: driver phases, search without Ray",
            "policy": str(policy), "device": device, "phases": phases, "run_dir": str(run_dir)}
