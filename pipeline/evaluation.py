"""Evaluation wiring of a run: which model each round evaluates, whether an earlier round's numbers stand, and
the call of ``rounds.evaluate.evaluate`` with the run's engines and sandbox (in-process, or as a GPU Ray task).

    phase_eval(ctx)                      # the eval phase of a round (``pipeline.driver.PHASES``)
    evaluate_model(cfg, run, 0, policy, None, problems, log)   # round 0 = the base model; ``python -m pipeline eval``

Round N evaluates the newest policy trained by round N (else the bootstrap model) and the newest PPM. When both
are the ones an earlier round evaluated, that round's numbers are copied (``reuse_eval``) with this round's own
search coverage. ``eval.full_rounds`` picks the rounds that get maj@k and the PPM metrics besides greedy pass@1.
Greedy chains depend on the policy alone: a greedy-only round whose policy an earlier round evaluated copies that
evaluation whatever its PPM, and a full round takes the earlier greedy pass@1 (``earlier_greedy``) and measures
only the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.context import RoundContext, cache_dir, on_accelerators
from rounds.schedule import policy_settings

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.runlog import RunLog
    from pipeline.storage import RunDir


def phase_eval(ctx: RoundContext) -> dict:
    if not ctx.cfg.eval.enabled:
        return {"skipped": "eval.enabled is false"}
    write_metrics(ctx)
    solved = len(ctx.run.trees(ctx.round_no).solved_problem_ids())
    lineage = ctx.lineage
    trained = lineage.newest_policy(ctx.round_no)
    policy = trained or lineage.bootstrap
    ppm = lineage.newest_ppm(ctx.round_no)
    full = full_eval(ctx.cfg, ctx.round_no)
    same = same_models_eval(ctx.run, ctx.round_no, {"policy": policy, "ppm": ppm}, full, ctx.cfg,
                            [p.id for p in ctx.eval_problems])
    if same is not None:
        # Nothing this round trained changed what is evaluated: the earlier numbers stand, re-measuring costs minutes.
        ctx.log.info("eval_reused", round=ctx.round_no, same_as_round=same,
                     reason="the policy and PPM are the ones an earlier round evaluated" if full else
                     "a greedy-only evaluation of the policy an earlier round evaluated")
        return reuse_eval(ctx.run, ctx.round_no, same, (solved, len(ctx.problems)), {"policy": policy, "ppm": ppm},
                          greedy_only=None if full else greedy_only_reason(ctx.cfg, ctx.round_no))
    greedy_from = earlier_greedy(ctx.run, ctx.round_no, policy, [p.id for p in ctx.eval_problems], ctx.cfg)
    return evaluate_model(ctx.cfg, ctx.run, ctx.round_no, policy, ppm, ctx.eval_problems,
                          ctx.log, trained=trained is not None, train_solved=(solved, len(ctx.problems)), full=full,
                          greedy_from=greedy_from)


def full_eval(cfg: RunConfig, round_no: int) -> bool:
    """Whether ``round_no`` gets maj@k and the PPM metrics besides greedy pass@1 (``eval.full_rounds``)."""
    return cfg.eval.full_rounds is None or round_no in cfg.eval.full_rounds


def greedy_only_reason(cfg: RunConfig, round_no: int) -> str:
    """Why a round that is not full skips maj@k and the PPM metrics (the report's footnote)."""
    return f"greedy only at round {round_no} (eval.full_rounds={cfg.eval.full_rounds})"


def models_in_run(run: RunDir, models: dict) -> dict:
    """``models`` with each path inside the run written relative to the run's root ("round_1/policy"): the same
    name whichever copy of the run a driver works on (an object-store run is staged in a new directory each time
    it resumes); a model outside the run (a hub id, the embedded model) keeps its name."""
    root = Path(run.root).resolve()
    out = {}
    for role, name in models.items():
        path = Path(name) if isinstance(name, str) and name else None
        inside = path is not None and path.is_absolute() and path.resolve().is_relative_to(root)
        out[role] = path.resolve().relative_to(root).as_posix() if inside else name
    return out


def _last_eval(run: RunDir, round_no: int) -> tuple[int, dict] | None:
    """(round, its eval.json) of the latest round before ``round_no`` that has one."""
    from rounds.report import read_json

    for r in range(round_no - 1, -1, -1):
        ev, _ = read_json(run.root / f"round_{r}" / "eval.json")
        if ev is not None:
            return r, ev
    return None


def _same(run: RunDir, ev: dict, models: dict, roles: tuple[str, ...]) -> bool:
    """Whether ``ev`` evaluated ``models`` in ``roles``, compared by their names in the run (``models_in_run``)
    where eval.json records them."""
    if "models_in_run" in ev:
        mine, theirs = models_in_run(run, models), ev["models_in_run"]
    else:
        mine, theirs = models, ev.get("models") or {}
    return all(mine.get(role) == theirs.get(role) for role in roles)


def _same_settings(ev: dict, cfg: RunConfig | None, *, budgets: bool) -> bool:
    """Whether ``ev`` was measured with ``cfg``'s seed and search settings (and, with ``budgets``, its evaluation
    budgets), where it recorded them: a run resumed with changed settings (--force) measures anew."""
    from rounds.evaluate import search_record

    if cfg is None:
        return True
    if ev.get("seed", cfg.seed) != cfg.seed or ev.get("search", search_record(cfg.search)) != search_record(cfg.search):
        return False
    return not budgets or ev.get("params", cfg.eval.budgets()) == cfg.eval.budgets()


def same_models_eval(run: RunDir, round_no: int, models: dict, full: bool, cfg: RunConfig | None = None,
                     problem_ids: list[str] | None = None) -> int | None:
    """The previous evaluated round when its numbers are this round's: a full evaluation of exactly ``models`` for
    a full round; for a greedy-only round, any evaluation of the same policy (greedy chains use no PPM). With
    ``cfg`` / ``problem_ids``, it must also have used their seed, search settings and budgets, and these problems,
    where it recorded them."""
    last = _last_eval(run, round_no)
    if last is None:
        return None
    r, ev = last
    if not _same(run, ev, models, ("policy", "ppm") if full else ("policy",)) or (full and not ev.get("full", True)):
        return None
    if not _same_settings(ev, cfg, budgets=full):
        return None
    recorded = ev.get("problems")
    if problem_ids is not None and isinstance(recorded, list) and recorded:
        if sorted(str(row.get("id")) for row in recorded) != sorted(map(str, problem_ids)):
            return None
    return ev.get("same_as_round", r)


def earlier_greedy(run: RunDir, round_no: int, policy: str, problem_ids: list[str], cfg: RunConfig | None = None):
    """The greedy chains of the previous evaluated round (``rounds.evaluate.GreedyFrom``) when it evaluated the same
    policy on these problems (with ``cfg``'s seed and search settings, where it recorded them): greedy decoding
    depends on the policy alone, so a full round whose PPM is new (or that is full where that one was greedy-only)
    takes them instead of decoding them again. None otherwise."""
    from rounds.evaluate import GreedyFrom

    last = _last_eval(run, round_no)
    if last is None:
        return None
    r, ev = last
    if not _same(run, ev, {"policy": policy}, ("policy",)):
        return None
    if not _same_settings(ev, cfg, budgets=False):
        return None  # a resumed run whose settings changed (--force): its chains would differ
    measured = (ev.get("counts") or {}).get("greedy", {}).get("same_as_round", ev.get("same_as_round", r))
    rows = GreedyFrom(round=measured, problems=list(ev.get("problems") or [])).by_id()
    if not problem_ids or any(i not in rows for i in problem_ids):
        return None
    return GreedyFrom(round=measured, problems=[rows[i] for i in problem_ids])


def reuse_eval(run: RunDir, round_no: int, same: int, train_solved: tuple[int, int],
               models: dict | None = None, greedy_only: str | None = None) -> dict:
    """round_N/eval.json as a copy of round ``same``'s held-out numbers, with this round's own search coverage and,
    when given, this round's ``models`` (a greedy-only copy may have a PPM the copied round had not) and this
    round's reason for skipping what a greedy-only evaluation skips (``greedy_only``)."""
    from rounds.report import read_json, write_json_atomic

    ev, reason = read_json(run.root / f"round_{same}" / "eval.json")
    if ev is None:
        raise RuntimeError(f"round {round_no}: cannot reuse round {same}'s evaluation ({reason})")
    solved, n = train_solved
    ev = dict(ev, round=round_no, same_as_round=same)
    if models is not None:
        ev.update(models=models, models_in_run=models_in_run(run, models))
    ev["metrics"] = dict(ev["metrics"], train_solved=solved / n if n else None)
    ev["counts"] = dict(ev.get("counts") or {})
    ev["skipped"] = dict(ev.get("skipped") or {})
    if greedy_only is not None:
        from rounds.evaluate import FULL_ONLY_KEYS

        ev["skipped"].update({k: greedy_only for k in FULL_ONLY_KEYS if k in ev["skipped"]})
    if n:
        ev["counts"]["train"] = {"solved": solved, "problems": n}
        ev["skipped"].pop("train_solved", None)
    write_json_atomic(run.root / f"round_{round_no}" / "eval.json", ev)
    return {"metrics": ev["metrics"], "skipped": ev["skipped"], "same_as_round": same}


def evaluate_model(cfg: RunConfig, run: RunDir, round_no: int, policy: str, ppm: str | None, problems: list,
                   log: RunLog, trained: bool = False, train_solved: tuple[int, int] | None = None,
                   full: bool = True, out_dir: Path | None = None, greedy_from=None) -> dict:
    """Evaluate one policy (+ PPM) on ``problems``; writes eval.json into ``out_dir`` (default round_N/; round 0 =
    the base model). ``full`` False: greedy pass@1 only. ``greedy_from`` (``earlier_greedy``): greedy pass@1 as an
    earlier round measured it for this policy, not decoded again."""
    from rounds.report import EVAL_FILE, write_json_atomic

    out_dir = out_dir if out_dir is not None else run.root / f"round_{round_no}"
    # The models as this driver names them: the task may see them at other paths (a node cache, on object storage).
    models = {"policy": policy, "ppm": ppm}
    args = (cfg, round_no, policy, ppm, problems, trained, train_solved, full, models, greedy_from)
    log.info("eval_start", round=round_no, policy=policy, ppm=ppm, problems=len(problems))
    # Progress lines reach the run log only in-process; a Ray task's output goes to the job log instead.
    say = None if cfg.ray.gpus_per_engine else (lambda msg: log.info("eval_progress", message=msg))
    console = getattr(log, "console", None)  # the live bars too (one per metric), in-process only
    track = None if cfg.ray.gpus_per_engine or console is None else (
        lambda label, total: console.bar(f"round {round_no} eval {label}", total, solved=True))
    result = on_accelerators(cfg, run, _evaluate, *args, say=say, track=track)
    result["models_in_run"] = models_in_run(run, models)  # what a later round (or a resumed driver) compares
    write_json_atomic(out_dir / EVAL_FILE, result)  # here, not in the task: it may run on a node without the run
    log.info("eval_done", round=round_no, **{k: v for k, v in result["metrics"].items() if v is not None})
    return {"metrics": result["metrics"], "skipped": result.get("skipped", {}), "counts": result.get("counts", {}),
            "n": result.get("n_problems")}


def _evaluate(cfg: RunConfig, round_no: int, policy: str, ppm: str | None, problems: list, trained: bool,
              train_solved: tuple[int, int] | None, full: bool, models: dict, greedy_from,
              say: Callable[[str], None] | None = None, track: Callable | None = None) -> dict:
    import data
    from pipeline.engines import make_policy, make_scorer, with_generation
    from pipeline.sandbox import SandboxPool
    from rounds.evaluate import TrainSolved, evaluate

    mode, few_shot = policy_settings(cfg.rounds.schedule, trained)
    cache = cache_dir(cfg)
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
                        greedy_only_reason=None if full else greedy_only_reason(cfg, round_no),
                        models=models, greedy_from=greedy_from, log=say, track=track)


def write_metrics(ctx: RoundContext) -> None:
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


def write_run_report(run: RunDir, log: RunLog) -> str:
    from rounds.report import write_report

    rounds = sorted({0, *run.rounds()}) if round0_done(run) else run.rounds()
    table = write_report(run.root, rounds)
    log.info("report_written", path=str(run.report_path))
    return table


def round0_done(run: RunDir) -> bool:
    return (run.root / "round_0" / "eval.json").is_file()


__all__ = ["phase_eval", "evaluate_model", "full_eval", "reuse_eval", "same_models_eval", "train_coverage",
           "write_metrics", "write_run_report", "round0_done"]
