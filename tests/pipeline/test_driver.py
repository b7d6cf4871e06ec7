"""Driver decisions that need no cluster (the phases themselves run in tests/test_end_to_end.py)."""

import dataclasses
import json
from pathlib import Path

from pipeline.config import load_config
from rounds.schedule import search_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_an_untrained_previous_policy_keeps_the_bootstrap_prompt():
    cfg = load_config(CONFIGS / "embedded.yaml")
    boot, second = cfg.rounds.schedule[0], cfg.rounds.schedule[1]
    # the SFT policy keeps its few-shot examples (it is trained on that prompt), but searches step by step
    assert (boot.gen_mode, boot.few_shot) == ("solution", True) and (second.gen_mode, second.few_shot) == ("step", True)
    kept = search_spec(cfg.rounds.schedule, second, policy_trained=False)
    assert (kept.gen_mode, kept.few_shot) == ("solution", True)
    assert (kept.rollouts, kept.children, kept.q_mode) == (second.rollouts, second.children, second.q_mode)
    assert search_spec(cfg.rounds.schedule, second, policy_trained=True) == second  # a fine-tuned policy uses the round's own
    assert search_spec(cfg.rounds.schedule, boot, policy_trained=False) == boot


def test_the_policy_trains_before_the_ppm_which_starts_from_it(tmp_path):
    import dataclasses

    from pipeline.driver import PHASES, RoundContext
    from pipeline.storage import RunDir

    names = [name for name, _ in PHASES]
    assert names.index("train_policy") < names.index("train_ppm")  # rStar-Math: PPM of round n from policy n
    cfg = load_config(CONFIGS / "embedded.yaml")
    run = RunDir(tmp_path / "run")
    ctx = RoundContext(cfg, run, 2, log=None, problems=[], eval_problems=[])
    assert ctx.lineage.ppm_backbone(2) == cfg.engines.policy_model  # no policy trained yet: the base model
    run.policy_dir(1).mkdir(parents=True)
    (run.policy_dir(1) / "config.json").write_text("{}")
    assert ctx.lineage.ppm_backbone(2) == str(run.policy_dir(1))  # round 2 trained none: the newest before it
    run.policy_dir(2).mkdir(parents=True)
    (run.policy_dir(2) / "config.json").write_text("{}")
    assert ctx.lineage.ppm_backbone(2) == str(run.policy_dir(2))  # this round's fine-tuned policy
    base = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, ppm_init="base"))
    ctx = RoundContext(base, run, 2, log=None, problems=[], eval_problems=[])
    assert ctx.lineage.ppm_backbone(2) == (cfg.engines.ppm_model or cfg.engines.policy_model)  # the earlier rule


def _store_trees(run, round_no, solved, unsolved):
    import pyarrow as pa

    schema = pa.schema([("problem_id", pa.string()), ("node", pa.int32())])  # the manifest is what counts here
    with run.trees(round_no, schema=schema, id_column="problem_id").writer(shard_problems=100) as w:
        for pid in solved + unsolved:
            w.append(pid, [{"problem_id": pid, "node": 0}], solved=pid in solved)


def test_train_coverage_is_a_union_over_rounds_and_never_falls(tmp_path):
    from pipeline.evaluation import train_coverage
    from pipeline.storage import RunDir

    run = RunDir(tmp_path / "run")
    _store_trees(run, 1, solved=["a", "b"], unsolved=["c", "d"])
    _store_trees(run, 2, solved=["c"], unsolved=["a", "b", "d"])  # round 2 re-solves neither a nor b
    _store_trees(run, 3, solved=[], unsolved=["e"])  # a new problem, unsolved
    # round 1: {a, b} of {a, b, c, d}; round 2: {a, b} | {c} of the same 4; round 3 adds e unsolved: 3 of 5
    assert [train_coverage(run, r) for r in (1, 2, 3)] == [(2, 4), (3, 4), (3, 5)]
    assert train_coverage(run, 0) == (0, 0)


def _eval_json(run, r, policy, ppm, full, greedy=(3, 10), extra=None):
    from rounds.report import write_json_atomic

    write_json_atomic(run.root / f"round_{r}" / "eval.json", {
        "round": r, "metrics": {"greedy_pass1": greedy[0] / greedy[1], "train_solved": None},
        "counts": {"greedy": {"correct": greedy[0], "problems": greedy[1]}}, "skipped": {"train_solved": "x"},
        "full": full, "models": {"policy": policy, "ppm": ppm}, **(extra or {})})


def test_a_resumed_driver_on_another_staging_copy_still_reuses_the_evaluation(tmp_path):
    # An object-store run is staged in a new directory each time a driver resumes it: the eval.json of round 1
    # names the policy under the old copy, this driver under its own. Both are round_1/policy of the run.
    from pipeline.evaluation import models_in_run, same_models_eval
    from pipeline.storage import RunDir

    run = RunDir(tmp_path / "now")
    old = RunDir(tmp_path / "before")
    names = models_in_run(old, {"policy": str(old.root / "round_1" / "policy"), "ppm": None})
    assert names == {"policy": "round_1/policy", "ppm": None}
    assert models_in_run(run, {"policy": "embedded:smollm2-135m", "ppm": None})["policy"] == "embedded:smollm2-135m"
    _eval_json(run, 1, str(old.root / "round_1" / "policy"), None, full=False, extra={"models_in_run": names})
    here = {"policy": str(run.root / "round_1" / "policy"), "ppm": None}
    assert same_models_eval(run, 2, here, full=False) == 1
    assert same_models_eval(run, 2, {"policy": str(run.root / "round_2" / "policy"), "ppm": None}, full=False) is None


def test_a_round_that_changed_no_model_reuses_the_earlier_evaluation(tmp_path):
    from pipeline.evaluation import reuse_eval, same_models_eval
    from pipeline.storage import RunDir
    from rounds.report import write_report

    run = RunDir(tmp_path / "run")
    _eval_json(run, 0, "base", None, full=True)
    _eval_json(run, 1, "r1/policy", None, full=False, greedy=(5, 10))
    # round 2 trained nothing new: same models as round 1, greedy-only both -> reuse round 1
    assert same_models_eval(run, 2, {"policy": "r1/policy", "ppm": None}, full=False) == 1
    # a full evaluation is not replaced by round 1's greedy-only numbers
    assert same_models_eval(run, 2, {"policy": "r1/policy", "ppm": None}, full=True) is None
    # a new PPM changes nothing a greedy-only evaluation measures (greedy chains use no PPM) ...
    assert same_models_eval(run, 2, {"policy": "r1/policy", "ppm": "r2/ppm"}, full=False) == 1
    # ... but a new policy is a new evaluation
    assert same_models_eval(run, 2, {"policy": "r2/policy", "ppm": None}, full=False) is None
    # round 1 that trained nothing: the base model again, round 0 was full
    assert same_models_eval(run, 1, {"policy": "base", "ppm": None}, full=False) == 0

    out = reuse_eval(run, 2, 1, (4, 8))
    assert out["same_as_round"] == 1 and out["metrics"]["greedy_pass1"] == 0.5
    # what the copy skips, it skips for this round's reason, not the copied round's
    _eval_json(run, 1, "r1/policy", None, full=False, greedy=(5, 10),
               extra={"skipped": {"maj_at_k": "greedy only at round 1", "train_solved": "x"}})
    assert reuse_eval(run, 2, 1, (4, 8), greedy_only="greedy only at round 2")["skipped"] == {
        "maj_at_k": "greedy only at round 2"}
    out = reuse_eval(run, 2, 1, (4, 8))
    assert out["metrics"]["train_solved"] == 0.5  # round 2's own search: 4/8
    # a chain of reuses points at the round that was measured
    assert same_models_eval(run, 3, {"policy": "r1/policy", "ppm": None}, full=False) == 1
    table = write_report(run.root, [0, 1, 2])
    r2 = [c.strip() for c in table.splitlines()[4].strip("|").split("|")]
    # 5/10 -> Wilson [24-76]; 4/8 -> centre (4 + 1.92) / 11.84 = 0.5, half 1.96 * sqrt(2 + 0.96) / 11.84 = 0.285
    assert r2[0].startswith("2 [") and r2[1] == "50.0% (5/10) [24-76]" and r2[5] == "50.0% (4/8) [22-78]"
    note = r2[0][len("2 "):]
    assert f"{note} round 2: evaluates the policy (a greedy-only evaluation, which uses no PPM) that round 1 " \
           f"evaluated, so its held-out numbers are round 1's" in table


def test_an_evaluation_with_other_settings_or_problems_is_not_reused(tmp_path):
    # A run resumed with changed settings (--force) measures anew what the earlier round measured otherwise.
    from pipeline.evaluation import same_models_eval
    from pipeline.storage import RunDir
    from rounds.evaluate import search_record

    cfg = load_config(CONFIGS / "tiny.yaml")
    run = RunDir(tmp_path / "run")
    rows = [{"id": "a", "reference": "1"}, {"id": "b", "reference": "2"}]
    _eval_json(run, 1, "r1/policy", None, full=True, extra={
        "seed": cfg.seed, "search": search_record(cfg.search), "params": cfg.eval.budgets(), "problems": rows})
    models = {"policy": "r1/policy", "ppm": None}
    assert same_models_eval(run, 2, models, True, cfg, ["b", "a"]) == 1
    assert same_models_eval(run, 2, models, True, dataclasses.replace(cfg, seed=cfg.seed + 1), ["a", "b"]) is None
    deeper = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, max_depth=cfg.search.max_depth + 1))
    assert same_models_eval(run, 2, models, True, deeper, ["a", "b"]) is None
    assert same_models_eval(run, 2, models, True, cfg, ["a", "c"]) is None  # other held-out problems
    more = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, maj_k=cfg.eval.maj_k + 1))
    assert same_models_eval(run, 2, models, True, more, ["a", "b"]) is None  # other budgets: a full round anew
    assert same_models_eval(run, 2, models, False, more, ["a", "b"]) == 1  # greedy-only: budgets do not matter


def test_a_full_round_takes_greedy_pass1_from_an_earlier_evaluation_of_its_policy(tmp_path):
    from pipeline.evaluation import earlier_greedy, reuse_eval
    from pipeline.storage import RunDir
    from rounds.report import build_table, write_json_atomic

    run = RunDir(tmp_path / "run")
    rows = [{"id": "a", "reference": "1", "greedy_answer": "1", "greedy_correct": True},
            {"id": "b", "reference": "2", "greedy_answer": None, "greedy_correct": False}]
    _eval_json(run, 2, "r2/policy", "r2/ppm", full=False, greedy=(1, 2), extra={"problems": rows})
    # round 3 trained nothing: a copy of round 2's, with this round's PPM recorded
    reuse_eval(run, 3, 2, (1, 2), {"policy": "r2/policy", "ppm": "r3/ppm"})
    got = earlier_greedy(run, 4, "r2/policy", ["b", "a"])
    assert got.round == 2  # the round that decoded them, not the copy
    assert [r["id"] for r in got.problems] == ["b", "a"]
    assert earlier_greedy(run, 4, "r4/policy", ["a", "b"]) is None  # another policy decodes anew
    assert earlier_greedy(run, 4, "r2/policy", ["a", "c"]) is None  # a problem it did not evaluate
    assert earlier_greedy(run, 2, "r2/policy", ["a"]) is None  # no earlier evaluation at all
    # a resumed run whose seed or search settings changed (--force) decodes anew
    from rounds.evaluate import search_record

    cfg = load_config(CONFIGS / "tiny.yaml")
    write_json_atomic(run.root / "round_3" / "eval.json", dict(
        json.loads((run.root / "round_3" / "eval.json").read_text()), seed=cfg.seed, search=search_record(cfg.search)))
    assert earlier_greedy(run, 4, "r2/policy", ["a", "b"], cfg).round == 2
    assert earlier_greedy(run, 4, "r2/policy", ["a", "b"], dataclasses.replace(cfg, seed=cfg.seed + 1)) is None
    deeper = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, max_depth=cfg.search.max_depth + 1))
    assert earlier_greedy(run, 4, "r2/policy", ["a", "b"], deeper) is None
    # round 4 evaluates fully with it; the report says whose greedy number it shows
    write_json_atomic(run.root / "round_4" / "eval.json", {
        "round": 4, "metrics": {"greedy_pass1": 0.5, "maj_at_k": 1.0, "train_solved": None},
        "counts": {"greedy": {"correct": 1, "problems": 2, "same_as_round": 2},
                   "maj": {"k": 2, "correct": 2, "problems": 2}},
        "skipped": {"train_solved": "x"}, "full": True, "models": {"policy": "r2/policy", "ppm": "r3/ppm"}})
    table, _ = build_table(run.root, [2, 3, 4])
    r4 = next(line for line in table.splitlines() if line.startswith("| 4"))
    note = r4.split("|")[2].strip()[len("50.0% (1/2) [9-91] "):]
    assert f"{note} round 4: greedy pass@1 is round 2's, which evaluated the same policy" in table


def test_unchanged_sft_data_is_not_retrained(tmp_path):
    from pipeline.driver import RoundContext
    from pipeline.storage import RunDir
    from pipeline.training import same_data_round

    cfg = load_config(CONFIGS / "tiny.yaml")
    run = RunDir(tmp_path / "run")
    run.mark_done(1, "train_policy", {"data": {"digest": "d1"}})
    (run.policy_dir(1)).mkdir(parents=True)
    (run.policy_dir(1) / "config.json").write_text("{}")
    run.mark_done(2, "train_policy", {"data": {"digest": "d1"}, "same_as_round": 1})
    ctx3 = RoundContext(cfg, run, 3, None, [], [])
    assert same_data_round(ctx3, "d1") == 1  # round 2 skipped as round 1's; round 3 the same again
    assert same_data_round(ctx3, "d2") is None  # new trajectories: train
    run.mark_done(3, "train_policy", {"data": {"digest": "d3"}})
    (run.policy_dir(3)).mkdir(parents=True)
    (run.policy_dir(3) / "config.json").write_text("{}")
    ctx4 = RoundContext(cfg, run, 4, None, [], [])
    assert same_data_round(ctx4, "d1") is None  # round 3 trained other data since: round 1's model is not newest
