"""The capacity model: costs read from a run's log, scaled to a config and a cluster (hand-computed values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.capacity import Cluster, estimate_round, measured_costs

REPO = Path(__file__).resolve().parents[2]
SUMMARY = {"event": "rollouts.summary", "round": 1, "done": 10, "expansions": 20, "proposals": 80, "nodes": 40,
           "tokens": 4000, "engine_busy_s": 20.0, "exec_s": 0.8, "score_wait_s": 4.0,
           "overhead_per_expansion_s": 0.01, "wall_s": 25.0, "engines": 1}


def write_log(path: Path, *events: dict) -> Path:
    lines = [json.dumps({"ts": "2026-12-01T00:00:00+00:00", "level": "info", **e}) for e in events]
    path.write_text("\n".join([*lines, "{\"cut short"]) + "\n")  # a killed writer's last line is skipped
    return path


def test_costs_are_per_unit_ratios_of_the_summary(tmp_path):
    (c,) = measured_costs(write_log(tmp_path / "log.jsonl", SUMMARY), {1: 2}).values()
    assert c.expansions_per_problem_rollout == 1.0  # 20 expansions / (10 problems x 2 rollouts)
    assert c.tokens_per_proposal == 50.0  # 4000 / 80
    assert c.nodes_per_proposal == 0.5  # 40 / 80
    assert c.engine_tok_s == 200.0  # 4000 tokens / 20 busy s
    assert c.sandbox_s_per_proposal == pytest.approx(0.01)  # 0.8 s / 80
    assert c.ppm_s_per_node == pytest.approx(0.1)  # 4 s / 40
    with pytest.raises(ValueError, match="no rollouts.summary"):
        measured_costs(write_log(tmp_path / "empty.jsonl", {"event": "run_start"}), {1: 2})


def test_estimate_scales_to_problems_rollouts_children_and_finds_the_bottleneck(tmp_path):
    (c,) = measured_costs(write_log(tmp_path / "log.jsonl", SUMMARY), {1: 2}).values()
    e = estimate_round(c, problems=1000, rollouts=4, children=5, cluster=Cluster(gpus=10, sandbox_cpus=4,
                                                                                  rollout_workers=2))
    # expansions 1000 x 4 x 1.0 = 4000; proposals x5 = 20000; tokens x50 = 1e6
    assert (e.expansions, e.proposals, e.tokens) == (4000, 20000, 1_000_000)
    # generation 1e6 / 200 = 5000 GPU-s; PPM 20000 x 0.5 nodes x 0.1 s = 1000 GPU-s; on 10 GPUs: 600 s
    assert (e.gen_gpu_s, e.ppm_gpu_s) == (5000, pytest.approx(1000))
    # sandbox 20000 x 0.01 = 200 CPU-s / 4 = 50 s; overhead 4000 x 0.01 = 40 s / 2 workers = 20 s
    assert e.wall_s == pytest.approx(600) and e.bottleneck.startswith("gpu")
    assert e.gpu_hours(Cluster(10, 4, 2)) == pytest.approx(600 * 10 / 3600)
    fast = estimate_round(c, 1000, 4, 5, Cluster(gpus=1000, sandbox_cpus=1, rollout_workers=2), engine_tok_s=1000)
    # GPUs: (1e6/1000 + 1000) / 1000 = 2 s; sandbox 200 s on one core: the sandbox saturates first
    assert fast.wall_s == pytest.approx(200) and fast.bottleneck == "sandbox cpus"


def test_cli_check_compares_the_measured_run_with_its_prediction(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config import dump_config, load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    log = write_log(tmp_path / "log.jsonl", SUMMARY)
    assert main(["capacity", str(tmp_path / "config.yaml"), "--from-log", str(log), "--check"]) == 0
    out = capsys.readouterr().out
    # (20 GPU-s generation + 4 GPU-s PPM) on 1 engine = 24 s, measured 25 s
    assert "| 1 | 24.0 | 25.0 | 0.96 |" in out, out
    assert main(["capacity", str(REPO / "configs" / "qwen2.5-math-7b.yaml"), "--from-log", str(log),
                 "--problems", "747000", "--gpus", "64", "--engine-tok-s", "2500"]) == 0
    out = capsys.readouterr().out
    assert "747,000 problems, 64 GPUs" in out and out.count("\n| ") >= 6, out  # header, 4 rounds, total
    assert main(["capacity", str(REPO / "configs" / "tiny.yaml"), "--from-log", str(tmp_path / "nope.jsonl")]) == 2


def test_each_target_round_takes_the_costs_of_a_measured_round_of_the_same_kind():
    from types import SimpleNamespace as S

    from pipeline.capacity import source_round

    measured = [S(gen_mode="solution", q_mode="terminal"), S(gen_mode="step", q_mode="terminal"),
                S(gen_mode="step", q_mode="ppm"), S(gen_mode="step", q_mode="ppm")]
    costs = dict.fromkeys([1, 2, 3, 4])
    assert source_round(S(gen_mode="step", q_mode="terminal"), 1, measured, costs) == 2  # not round 1 (solution)
    assert source_round(S(gen_mode="step", q_mode="ppm"), 4, measured, costs) == 4
    assert source_round(S(gen_mode="step", q_mode="ppm"), 2, measured, costs) == 3  # nearest of the alike
    assert source_round(S(gen_mode="solution", q_mode="ppm"), 3, measured, costs) == 3  # none alike: nearest
