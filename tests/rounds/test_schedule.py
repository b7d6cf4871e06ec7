"""The round schedule: defaults follow DESIGN.md's table; impossible schedules are refused."""

import pytest

from rounds.schedule import RoundsConfig, RoundSpec, parse_round_range


def test_default_schedule_matches_design_table():
    s = RoundsConfig().schedule
    assert [r.policy for r in s] == ["bootstrap", "previous", "previous", "previous"]
    assert [r.q_mode for r in s] == ["terminal", "terminal", "ppm", "ppm"]
    assert [(r.rollouts, r.children) for r in s] == [(8, 5), (16, 8), (16, 8), (16, 8)]
    # round 4: unsolved problems escalate to 64, then 128 rollouts (rStar-Math)
    assert s[3].unsolved_rollouts == (64, 128) and all(not r.unsolved_rollouts for r in s[:3])
    assert s[0].gen_mode == "solution" and s[0].few_shot


@pytest.mark.parametrize(
    "schedule, match",
    [
        ([], "at least one round"),
        ([RoundSpec(policy="previous")], "round 1 has no previous policy"),
        ([RoundSpec(policy="bootstrap", q_mode="ppm")], "round 1 has no trained PPM"),
        ([RoundSpec(policy="bootstrap", train_ppm=False), RoundSpec(q_mode="ppm")], "trains no PPM"),
    ],
)
def test_impossible_schedules(schedule, match):
    with pytest.raises(ValueError, match=match):
        RoundsConfig(schedule=schedule)


@pytest.mark.parametrize("stages", [(16,), (64, 64), (128, 64), (8,)])
def test_escalation_stages_must_grow(stages):
    with pytest.raises(ValueError, match=r"unsolved_rollouts=\[.*\]: each stage must be an integer larger"):
        RoundSpec(rollouts=16, unsolved_rollouts=stages)
    assert RoundSpec(rollouts=16, unsolved_rollouts=(64, 128)).unsolved_rollouts == (64, 128)


def test_round_spec_ranges():
    with pytest.raises(ValueError, match="rollouts=0: must be >= 1"):
        RoundSpec(rollouts=0)
    with pytest.raises(ValueError, match="children=0"):
        RoundSpec(children=0)


@pytest.mark.parametrize("text, expected", [("1-4", [1, 2, 3, 4]), ("2", [2]), ("3-", [3, 4]), ("-2", [1, 2])])
def test_parse_round_range(text, expected):
    assert parse_round_range(text, 4) == expected


@pytest.mark.parametrize("text", ["0", "5", "3-2", "x", "1-9"])
def test_parse_round_range_rejects(text):
    with pytest.raises(ValueError, match="--rounds"):
        parse_round_range(text, 4)
