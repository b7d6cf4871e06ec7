import dataclasses

import pytest

from mcts.config import ExtractConfig, SearchConfig


def test_defaults_are_rstar_math_numbers():
    cfg = SearchConfig()
    assert (cfg.c_puct, cfg.max_depth, cfg.max_consecutive_errors, cfg.unvisited) == (2.0, 16, 2, "zero")
    assert cfg.parallel_rollouts == 1  # one rollout after another, as rStar-Math searches
    assert (cfg.extract.sft_top_n, cfg.extract.pair_top_k) == (2, 2)
    assert not cfg.uses_scorer and SearchConfig(mode="ppm").uses_scorer and SearchConfig(mode="test_time").uses_scorer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rollouts": 0}, "rollouts=0: must be an integer >= 1"),
        ({"children": -2}, "children=-2: must be an integer >= 1"),
        ({"max_depth": 0}, "max_depth=0: must be an integer >= 1"),
        ({"max_consecutive_errors": 0}, "max_consecutive_errors=0: must be an integer >= 1"),
        ({"parallel_rollouts": 0}, "parallel_rollouts=0: must be an integer >= 1"),
        ({"c_puct": -1.0}, "c_puct=-1.0: must be a finite number >= 0"),
        ({"c_puct": float("nan")}, "c_puct=nan"),
        ({"prior_weight": 0.0}, "prior_weight=0.0: must be a finite number > 0"),
        ({"mode": "greedy"}, "mode='greedy': must be one of 'terminal', 'ppm', 'test_time'"),
        ({"unvisited": "one"}, "unvisited='one'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as e:
        SearchConfig(**kwargs)
    assert message in str(e.value)


def test_extract_config_checks():
    with pytest.raises(ValueError, match=r"min_margin=-0.1: must be in \[0, 2\]"):
        ExtractConfig(min_margin=-0.1)
    with pytest.raises(ValueError, match="pair_top_k=0"):
        ExtractConfig(pair_top_k=0)
    with pytest.raises(ValueError, match="sft_top_n=-1"):
        ExtractConfig(sft_top_n=-1)


def test_per_round_copies_are_revalidated():
    cfg = dataclasses.replace(SearchConfig(), rollouts=8, children=5, mode="ppm")
    assert (cfg.rollouts, cfg.children, cfg.mode) == (8, 5, "ppm")
    with pytest.raises(ValueError, match="children=0"):
        dataclasses.replace(cfg, children=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rollouts = 3  # type: ignore[misc]
