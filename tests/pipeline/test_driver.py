"""Driver decisions that need no cluster (the phases themselves run in tests/test_end_to_end.py)."""

from pathlib import Path

from pipeline.config import load_config
from pipeline.driver import search_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_an_untrained_previous_policy_keeps_the_bootstrap_prompt():
    cfg = load_config(CONFIGS / "embedded.yaml")
    boot, second = cfg.rounds.schedule[0], cfg.rounds.schedule[1]
    assert (boot.gen_mode, boot.few_shot) == ("solution", True) and (second.gen_mode, second.few_shot) == (
        "step",
        False,
    )
    kept = search_spec(cfg, second, policy_trained=False)
    assert (kept.gen_mode, kept.few_shot) == ("solution", True)
    assert (kept.rollouts, kept.children, kept.q_mode) == (second.rollouts, second.children, second.q_mode)
    assert search_spec(cfg, second, policy_trained=True) == second  # a fine-tuned policy uses the round's own
    assert search_spec(cfg, boot, policy_trained=False) == boot


def test_the_policy_trains_before_the_ppm_which_starts_from_it(tmp_path):
    import dataclasses

    from pipeline.driver import PHASES, RoundContext
    from pipeline.storage import RunDir

    names = [name for name, _ in PHASES]
    assert names.index("train_policy") < names.index("train_ppm")  # rStar-Math: PPM of round n from policy n
    cfg = load_config(CONFIGS / "embedded.yaml")
    run = RunDir(tmp_path / "run")
    ctx = RoundContext(cfg, run, 2, log=None, problems=[], eval_problems=[])
    assert ctx.ppm_backbone() == cfg.engines.policy_model  # no policy trained yet: the base model
    run.policy_dir(1).mkdir(parents=True)
    (run.policy_dir(1) / "config.json").write_text("{}")
    assert ctx.ppm_backbone() == str(run.policy_dir(1))  # round 2 trained none: the newest before it
    run.policy_dir(2).mkdir(parents=True)
    (run.policy_dir(2) / "config.json").write_text("{}")
    assert ctx.ppm_backbone() == str(run.policy_dir(2))  # this round's fine-tuned policy
    base = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, ppm_init="base"))
    ctx = RoundContext(base, run, 2, log=None, problems=[], eval_problems=[])
    assert ctx.ppm_backbone() == (cfg.engines.ppm_model or cfg.engines.policy_model)  # the earlier rule
