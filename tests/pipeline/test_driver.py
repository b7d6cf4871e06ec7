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
