import json

import pytest

from rounds.report import METRICS_FILE, fraction_text, update_metrics, wilson_interval, write_json_atomic, write_report


def _eval(greedy, maj, bon, mcts, train, *, skipped=None, k=4, n=4):
    # Fractions and their counts over 3 held-out problems (train: over 10 problems).
    metrics = {"greedy_pass1": greedy, "maj_at_k": maj, "ppm_best_of_n": bon, "ppm_mcts": mcts,
               "train_solved": train}
    counts = {"greedy": {"correct": round(3 * greedy), "problems": 3},
              "maj": {"k": k, "correct": round(3 * maj), "problems": 3}}
    if bon is not None:
        counts["best_of_n"] = {"n": n, "correct": round(3 * bon), "problems": 3}
    if mcts is not None:
        counts["mcts"] = {"rollouts": 8, "children": 4, "correct": round(3 * mcts), "problems": 3}
    if train is not None:
        counts["train"] = {"solved": round(10 * train), "problems": 10}
    return {"round": 0, "metrics": metrics, "counts": counts, "skipped": skipped or {}}


@pytest.fixture
def run_dir(tmp_path):
    no_ppm = "no PPM: round 0 is the base model"
    write_json_atomic(tmp_path / "round_0" / "eval.json",
                      _eval(1 / 3, 1 / 3, None, None, None,
                            skipped={"ppm_best_of_n": no_ppm, "ppm_mcts": no_ppm,
                                     "train_solved": "no search in round 0"}))
    write_json_atomic(tmp_path / "round_1" / "eval.json", _eval(2 / 3, 2 / 3, 1.0, 2 / 3, 0.5))
    update_metrics(tmp_path / "round_1", ppm_pairwise_acc=0.75, ppm_heldout_pairs=8, sft_final_loss=0.41234)
    update_metrics(tmp_path / "round_1", sft_rows=20, ppm_pairs=64)  # merges, keeps earlier keys
    update_metrics(tmp_path / "round_1", coverage_solved=6, coverage_problems=10)
    # round_2 has neither file: the run stopped before it
    return tmp_path


def test_update_metrics_merges(run_dir):
    data = json.loads((run_dir / "round_1" / METRICS_FILE).read_text())
    assert data == {"ppm_pairwise_acc": 0.75, "ppm_heldout_pairs": 8, "sft_final_loss": 0.41234, "sft_rows": 20,
                    "ppm_pairs": 64, "coverage_solved": 6, "coverage_problems": 10}


def test_write_report_table_numbers_and_footnotes(run_dir):
    table = write_report(run_dir, [0, 1, 2])
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # k and N are the same in every round that has them, so they go into the titles
    assert header == ["round", "greedy pass@1", "maj@4", "PPM best-of-4", "PPM MCTS", "train solved by search",
                      "train coverage", "PPM pairwise acc", "SFT final loss", "SFT rows", "PPM pairs"]
    r0 = [c.strip() for c in lines[2].strip("|").split("|")]
    r1 = [c.strip() for c in lines[3].strip("|").split("|")]
    r2 = [c.strip() for c in lines[4].strip("|").split("|")]
    # Wilson intervals, whole percent (see test_wilson_interval_hand_computed for the arithmetic):
    # 1/3 -> [6-79], 2/3 -> [21-94], 3/3 -> [44-100], 5/10 -> [24-76], 6/10 -> [31-83], 6/8 -> [41-93]
    # round 0: 1/3 = 33.3%; PPM columns skipped with the evaluator's reason (one footnote shared by both)
    assert r0[:3] == ["0 (base)", "33.3% (1/3) [6-79]", "33.3% (1/3) [6-79]"]
    assert r0[3] == r0[4] == "- [1]"
    assert r0[5] == "- [2]"
    assert r0[6] == r0[7] == r0[10] == "- [3]"
    # round 1: 2/3 = 66.7%, 3/3 = 100.0%, train 5/10 = 50.0%, coverage 6/10, accuracy 0.75 of 8 pairs = 6/8
    assert r1 == ["1", "66.7% (2/3) [21-94]", "66.7% (2/3) [21-94]", "100.0% (3/3) [44-100]",
                  "66.7% (2/3) [21-94]", "50.0% (5/10) [24-76]", "60.0% (6/10) [31-83]", "75.0% (6/8) [41-93]",
                  "0.4123", "20", "64"]
    # round 2: nothing there
    assert r2[1] == "- [4]" and r2[6] == "- [5]"
    assert "[1] round 0: no PPM: round 0 is the base model" in table
    assert "[2] round 0: no search in round 0" in table
    assert "[3] round 0: round 0 is the base model: nothing is trained" in table
    assert "[4] round 2: no eval.json in round_2/" in table
    assert "[5] round 2: no metrics.json in round_2/" in table

    md = (run_dir / "report.md").read_text()
    assert table in md and "rounds.png" in md
    png = (run_dir / "rounds.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(run_dir.glob(".*tmp*")), "temp files must be renamed away"


def test_wilson_interval_hand_computed():
    # z = 1.959964, z2 = z * z = 3.841459
    # 0/10: centre = (0 + z2/2) / (10 + z2) = 1.920729 / 13.841459 = 0.138767;
    #       half = z * sqrt(0 + z2/4) / (10 + z2) = 1.96 * 0.98 / 13.841459 = 0.138767 -> [0, 0.277533]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-5)
    # 5/10: centre 0.5; half = 1.96 * sqrt(2.5 + 0.960365) / 13.841459 = 1.96 * 1.860206 / 13.841459 = 0.263407
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-5)
    # 1/3: centre = (1 + 1.920729) / 6.841459 = 0.426917; half = 1.96 * sqrt(2/3 + 0.960365) / 6.841459
    #      = 1.96 * 1.275556 / 6.841459 = 0.365425 -> [0.061492, 0.792342]
    assert wilson_interval(1, 3) == pytest.approx((0.061492, 0.792340), abs=1e-5)
    # 3/3: centre = 4.920729 / 6.841459 = 0.719253; half = 1.96 * 0.98 / 6.841459 = 0.280747 -> [0.438503, 1.0]
    assert wilson_interval(3, 3) == pytest.approx((0.438503, 1.0), abs=1e-5)
    # 12/59 (the base model's score on the team's 59 easy problems): [0.1204, 0.3227]
    assert wilson_interval(12, 59) == pytest.approx((0.120363, 0.322680), abs=1e-5)
    assert fraction_text(12, 59) == "20.3% (12/59) [12-32]"
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k=4"):
        wilson_interval(4, 3)


def test_missing_ppm_accuracy_says_why(tmp_path):
    for r in (1, 2):
        write_json_atomic(tmp_path / f"round_{r}" / "eval.json", _eval(0.0, 0.0, 0.0, 0.0, 0.1))
    update_metrics(tmp_path / "round_1", ppm_pairwise_acc=None, ppm_heldout_pairs=0, ppm_pairs=3, sft_rows=1)
    update_metrics(tmp_path / "round_2", ppm_pairwise_acc=None, ppm_heldout_pairs=None, ppm_pairs=0, sft_rows=0)
    table = write_report(tmp_path, [1, 2])
    assert "round 1: no pair held out - pairs are held out by whole problem, and this round's 3 pairs" in table
    assert "round 2: no PPM trained (0 preference pairs)" in table


def test_write_report_mixed_k_and_bad_files(tmp_path):
    write_json_atomic(tmp_path / "round_1" / "eval.json", _eval(0.0, 0.0, 0.0, 0.0, 0.0, k=2))
    write_json_atomic(tmp_path / "round_2" / "eval.json", _eval(1.0, 1.0, 1.0, 1.0, 1.0, k=8))
    (tmp_path / "round_2" / METRICS_FILE).write_text("{not json")
    table = write_report(tmp_path, [2, 1])
    assert "| maj@k " in table  # k differs between rounds: generic title
    assert "round 2: metrics.json unreadable (JSONDecodeError" in table
    assert table.splitlines()[2].startswith("| 1 ")  # rounds sorted


def test_write_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope", [0])
    with pytest.raises(ValueError, match="rounds=\\[\\]"):
        write_report(tmp_path, [])


def test_write_report_with_no_numbers_still_plots(tmp_path):
    table = write_report(tmp_path, [0])
    assert "[1] round 0: no eval.json in round_0/" in table
    assert "| maj@k " in table and "| PPM best-of-N " in table  # no budgets recorded: generic titles
    assert (tmp_path / "rounds.png").stat().st_size > 0
