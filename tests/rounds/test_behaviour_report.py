"""Behaviour frequencies across rounds: the report's table and plot, and pipeline info's lines."""

from __future__ import annotations

import json

from pipeline.info import info
from rounds.behaviour_report import behaviour_lines, behaviour_section, behaviour_table, read_counts
from rounds.report import write_report


def counts(correct: int, wrong: int, c: dict, w: dict) -> dict:
    keys = ("verification", "backtracking", "subgoal_setting", "backward_chaining")
    return {"tagger": "rules", "trajectories": {"correct": correct, "wrong": wrong},
            "with_behaviour": {"correct": {k: c.get(k, 0) for k in keys}, "wrong": {k: w.get(k, 0) for k in keys}}}


def make_run(tmp_path):
    run = tmp_path / "run"
    for r, data in ((1, counts(4, 8, {"verification": 2, "subgoal_setting": 1}, {"verification": 1})),
                    (2, counts(3, 0, {"backtracking": 3}, {}))):
        (run / f"round_{r}").mkdir(parents=True)
        (run / f"round_{r}" / "behaviours.json").write_text(json.dumps(data))
    (run / "round_3").mkdir()  # searched but not exported: no counts
    (run / "config.yaml").write_text("name: demo\nseed: 1\n")
    return run


def test_table_shows_shares_with_counts_and_says_why_a_round_has_none(tmp_path):
    run = make_run(tmp_path)
    table = behaviour_table(run, [1, 2, 3]).splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:5]]
    # round 1: verification 2/4 = 50% of correct, 1/8 = 12% (12.5 rounds to even) of wrong; subgoal 1/4 = 25%.
    assert cells[0] == ["1", "4 / 8", "50% (2/4) / 12% (1/8)", "0% (0/4) / 0% (0/8)", "25% (1/4) / 0% (0/8)",
                        "0% (0/4) / 0% (0/8)"]
    # round 2: no wrong trajectories, so no share of them ('-', not 0%).
    assert cells[1][:3] == ["2", "3 / 0", "0% (0/3) / -"] and cells[1][3] == "100% (3/3) / -"
    assert cells[2] == ["3", "- [1]", "-", "-", "-", "-"]
    assert table[-1].startswith("[1] round 3: no behaviours.json in round_3/")


def test_section_writes_the_plot_and_is_empty_without_counts(tmp_path):
    run = make_run(tmp_path)
    section = behaviour_section(run, [0, 1, 2, 3])
    assert "## Cognitive behaviours" in section and "![behaviours across rounds](behaviours.png)" in section
    assert "| 0 " not in section  # round 0 is the base model: never searched
    png = (run / "behaviours.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    empty = tmp_path / "empty"
    (empty / "round_1").mkdir(parents=True)
    assert behaviour_section(empty, [1]) == "" and not (empty / "behaviours.png").exists()


def test_report_and_info_show_the_behaviours(tmp_path):
    run = make_run(tmp_path)
    write_report(run, [1, 2, 3])
    md = (run / "report.md").read_text()
    assert "## Cognitive behaviours in the search trees" in md and "50% (2/4) / 12% (1/8)" in md
    text = info(run)
    assert "  behaviours in 4 correct trajectories: verif. 50%, backtr. 0%, subgoal 25%, backw. 0%" in text
    assert "  behaviours in 8 wrong trajectories: verif. 12%, backtr. 0%, subgoal 0%, backw. 0%" in text
    assert "  behaviours in 0 wrong trajectories: -" in text  # round 2
    assert f"behaviour plot: {run / 'behaviours.png'}" in text


def test_a_damaged_counts_file_is_a_reason_not_a_crash(tmp_path):
    (tmp_path / "behaviours.json").write_text('{"trajectories": {"correct": 1}}')
    data, reason = read_counts(tmp_path)
    assert data is None and "unreadable (KeyError" in reason
    assert behaviour_lines(tmp_path) == []
