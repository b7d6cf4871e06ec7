"""The rule-based behaviour tagger against a hand-labelled set (tests/mcts/data/behaviours_labelled.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data.generators.countdown import countdown_question
from mcts.behaviours import (
    BEHAVIOURS,
    StepText,
    behaviours_of,
    check_behaviours,
    question_target,
    tag_step,
    tag_trajectory,
)

LABELLED = Path(__file__).parent / "data" / "behaviours_labelled.yaml"
HELDOUT = Path(__file__).parent / "data" / "behaviours_heldout.yaml"
MIN_SCORE = 0.8


def load_labelled(path: Path = LABELLED) -> list[dict]:
    items = yaml.safe_load(path.read_text())
    for item in items:
        if "numbers" in item:
            item["question"] = countdown_question(item["numbers"], item["target"])
        item["steps"] = [StepText(s["text"], s.get("output", "")) for s in item["steps"]]
        check_behaviours(item["labels"], f"{item['id']}.labels")
    return items


def scores(pairs: list[tuple[set[str], set[str]]]) -> dict[str, tuple[float, float, int, int, int]]:
    """behaviour -> (precision, recall, tp, fp, fn) over (gold, predicted) label sets."""
    out = {}
    for b in BEHAVIOURS:
        tp = sum(b in g and b in p for g, p in pairs)
        fp = sum(b not in g and b in p for g, p in pairs)
        fn = sum(b in g and b not in p for g, p in pairs)
        out[b] = (tp / (tp + fp) if tp + fp else 1.0, tp / (tp + fn) if tp + fn else 1.0, tp, fp, fn)
    return out


def test_scores_are_computed_as_defined():
    # 3 items: gold {v}, {v, b}, {} ; predicted {v}, {b}, {v}
    # verification: tp 1 (item 1), fp 1 (item 3), fn 1 (item 2) -> precision 1/2, recall 1/2
    # backtracking: tp 1, fp 0, fn 0 -> 1.0, 1.0
    s = scores([({"verification"}, {"verification"}), ({"verification", "backtracking"}, {"backtracking"}),
                (set(), {"verification"})])
    assert s["verification"] == (0.5, 0.5, 1, 1, 1)
    assert s["backtracking"] == (1.0, 1.0, 1, 0, 0)


def test_labelled_set_is_large_and_covers_every_behaviour_and_negatives():
    items = load_labelled()
    assert len(items) >= 40, len(items)
    assert len({i["id"] for i in items}) == len(items)
    for b in BEHAVIOURS:
        positives = sum(b in i["labels"] for i in items)
        assert positives >= 8, (b, positives)
    assert sum(not i["labels"] for i in items) >= 12  # trajectories with no behaviour at all


def evaluate(items: list[dict]) -> tuple[dict, str, list[str]]:
    pairs, errors = [], []
    for item in items:
        predicted = set(behaviours_of(tag_trajectory(item["steps"], item["question"])))
        gold = set(item["labels"])
        pairs.append((gold, predicted))
        if predicted != gold:
            errors.append(f"{item['id']}: gold {sorted(gold)} predicted {sorted(predicted)}")
    s = scores(pairs)
    table = "\n".join(f"{b:18s} precision {p:.3f} recall {r:.3f} (tp {tp}, fp {fp}, fn {fn})"
                      for b, (p, r, tp, fp, fn) in s.items())
    return s, table, errors


def test_precision_and_recall_per_behaviour_on_the_labelled_set():
    items = load_labelled()
    s, table, errors = evaluate(items)
    print(f"\n{len(items)} labelled trajectories\n{table}\nmistakes:\n" + "\n".join(errors))
    for b, (p, r, *_) in s.items():
        assert p >= MIN_SCORE and r >= MIN_SCORE, f"{b}: precision {p:.3f} recall {r:.3f}\n{table}\n" + "\n".join(errors)


# True positives the frozen rules found on the held-out set when it was written (16 items): verification 0 of 6,
# backtracking 2 of 3, subgoal_setting 0 of 3, backward_chaining 3 of 3; one false positive (verification,
# "She has verified 12 of the 30 forms"). The rules' vocabulary does not carry over to new phrasing; this test
# keeps that measurement visible and fails if a rule change loses a hit or adds a false positive here.
HELDOUT_TP = {"verification": 0, "backtracking": 2, "subgoal_setting": 0, "backward_chaining": 3}
HELDOUT_FP = 1


def test_held_out_set_is_measured_and_does_not_regress():
    items = load_labelled(HELDOUT)
    s, table, errors = evaluate(items)
    print(f"\n{len(items)} held-out trajectories\n{table}\nmistakes:\n" + "\n".join(errors))
    assert len(items) >= 16
    for b, (_, _, tp, _, _) in s.items():
        assert tp >= HELDOUT_TP[b], f"{b}: {tp} held-out hits, was {HELDOUT_TP[b]}\n{table}"
    assert sum(v[3] for v in s.values()) <= HELDOUT_FP, table


def test_tags_carry_step_index_evidence_and_rule():
    steps = [StepText("# Add 8 and 3.\na = 8 + 3\nprint(a)", "11"),
             StepText("# 11 + 5 is 16, not 19. That does not work, so try multiplying instead.\nb = 8 * 3\nprint(b)",
                      "24")]
    tags = tag_trajectory(steps, countdown_question([8, 3, 5], 19))
    assert {(t.behaviour, t.step) for t in tags} == {("verification", 1), ("backtracking", 1)}
    for t in tags:
        assert t.evidence == "11 + 5 is 16, not 19. That does not work, so try multiplying instead."
        assert t.rule.startswith(t.behaviour + ".")
    long = StepText("# Let me verify " + "this very long reasoning line " * 5 + "\nprint(1)")
    (tag,) = tag_step([long], 0)
    assert tag.behaviour == "verification" and len(tag.evidence) == 80 and tag.evidence.endswith("...")


def test_silent_restart_needs_the_earlier_step_and_spares_continuations():
    first = StepText("# Add 6 and 5.\nx = 6 + 5\nprint(x)", "11")
    restart = StepText("# Multiply 6 and 5.\nx = 6 * 5\nprint(x)", "30")
    uses_value = StepText("# Subtract from 20.\nx = 20 - 11\nprint(x)", "9")
    uses_name = StepText("# Double it.\nx = x * 2\nprint(x)", "22")
    assert [t.rule for t in tag_step([first, restart], 1)] == ["backtracking.silent_restart"]
    assert tag_step([restart], 0) == []  # no earlier step: nothing was thrown away
    assert tag_step([first, uses_value], 1) == []
    assert tag_step([first, uses_name], 1) == []


def test_answer_and_output_lines_are_not_reasoning():
    step = StepText("# The answer is \\boxed{6 * 4}\n# output: check that 24 == 24")
    assert tag_step([step], 0) == []


def test_backward_chaining_from_the_target_needs_a_target():
    step = StepText("# 84 / 4 = 21, and 21 = 7 * 3.\nprint(84 / 4, 7 * 3)", "21.0 21")
    assert question_target(countdown_question([4, 7, 3, 6], 84)) == "84"
    assert behaviours_of(tag_step([step], 0, countdown_question([4, 7, 3, 6], 84))) == ["backward_chaining"]
    assert question_target("Sam has 84 books. He gives 4 away. How many are left?") is None
    assert tag_step([step], 0, "Sam has 84 books. How many are left?") == []


def test_behaviours_of_orders_and_check_behaviours_names_the_bad_one():
    assert behaviours_of(["backward_chaining", "verification", "verification"]) == ["verification",
                                                                                    "backward_chaining"]
    assert check_behaviours(["verification"], "x") == ("verification",)
    with pytest.raises(ValueError, match=r"search.extract.prefer_behaviours=\['verify'\]: unknown behaviour"):
        check_behaviours(["verify"], "search.extract.prefer_behaviours")


def test_prefer_behaviours_moves_matches_ahead_and_keeps_each_groups_order():
    from mcts.behaviours import prefer_behaviours

    shown = {"a": [], "b": ["subgoal_setting"], "c": ["verification"], "d": ["backtracking", "verification"]}
    best_first = ["a", "b", "c", "d"]
    assert prefer_behaviours(best_first, shown.get, ("verification", "backtracking")) == ["c", "d", "a", "b"]
    assert prefer_behaviours(best_first, shown.get, ("backtracking",)) == ["d", "a", "b", "c"]
    assert prefer_behaviours(best_first, shown.get, ()) == best_first  # off: unchanged
