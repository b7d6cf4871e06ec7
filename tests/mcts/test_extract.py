"""Pair / trajectory selection on a hand-built tree whose Q-values are set directly (Q = W / N)."""

import pyarrow as pa
import pytest

from data.schemas import PPM_PAIRS_SCHEMA, SFT_SCHEMA, STEPS_SCHEMA
from mcts.config import ExtractConfig
from mcts.extract import (
    edit_distance,
    export_row,
    extract,
    final_pairs,
    leads_to,
    sft_records,
    step_labels,
    step_pairs,
)
from mcts.steps import parse_step
from mcts.tree import Tree, TreeInfo


def _add(t, parent, name, q, status="open", verdict=""):
    text = f"# {name}\n\\boxed{{{name}}}" if status == "terminal" else f"# {name}\n{name} = 1"
    node = t.add_child(t.new_id(), parent, parse_step(text), "", status, verdict)
    node.visits, node.value_sum = 4, 4 * q  # Q = W / N = q
    return node.id


def _tree():
    r"""root
       H (Q .75) -> h1 correct (.5)
       A (Q .5)  -> a1 correct (1.0), a2 wrong (-1.0)
       B (Q .25) -> b1 correct (1.0)
       F (Q .1)  -> f1 correct (1.0)
       G (Q 0)   -> g1 wrong (-1.0)
       D (Q -.4) -> d1 wrong (-1.0)
       C (Q -1)  -> c1 wrong (-1.0)
       E (Q -1)  dead end (no terminal below)
    """
    t = Tree(TreeInfo("p7", "What?", "x", 2, "terminal", 1.0, 0))
    ids = {}
    for name, q, kids in [
        ("H", 0.75, [("h1", 0.5, "correct")]),
        ("A", 0.5, [("a1", 1.0, "correct"), ("a2", -1.0, "wrong")]),
        ("B", 0.25, [("b1", 1.0, "correct")]),
        ("F", 0.1, [("f1", 1.0, "correct")]),
        ("G", 0.0, [("g1", -1.0, "wrong")]),
        ("D", -0.4, [("d1", -1.0, "wrong")]),
        ("C", -1.0, [("c1", -1.0, "wrong")]),
    ]:
        ids[name] = _add(t, 0, name, q)
        for kid, kq, verdict in kids:
            ids[kid] = _add(t, ids[name], kid, kq, "terminal", verdict)
    ids["E"] = _add(t, 0, "E", -1.0)
    t.make_dead(ids["E"], -1.0)
    return t, ids


def test_leads_to_correct_and_wrong():
    t, ids = _tree()
    flags = leads_to(t)
    assert flags[ids["A"]] == (True, True)  # both below: A is on both sides (rStar: final_correct, final_wrong)
    assert flags[ids["G"]] == (False, True) and flags[ids["E"]] == (False, False)  # a dead end leads nowhere
    assert flags[0] == (True, True)


# The fixture's one-letter steps are a few characters apart; the edit-distance filter has its own test.
NO_EDIT = {"min_edit_distance": 0}


def test_step_pairs_top2_correct_vs_bottom2_wrong_with_margin():
    t, ids = _tree()
    pairs = step_pairs(t, ExtractConfig(pair_top_k=2, min_margin=0.7, **NO_EDIT))
    got = [(p.chosen_id, p.rejected_id, round(p.margin, 6)) for p in pairs]
    # root: positives H (.75), A (.5) [B .25, F .1 are 3rd/4th]; negatives C (-1), D (-.4) [G 0, A .5 follow]
    #   H-C = .75 + 1 = 1.75; H-D = .75 + .4 = 1.15; A-C = 1.5; A-D = .9   (all >= .7)
    #   continuations: H -> h1 (.75 + .5)/2 = .625, A -> a1 .75 beat C -> c1 -1 and D -> d1 -.7
    # node A: a1 (1.0) vs a2 (-1.0): 2.0
    assert got == [
        (ids["H"], ids["C"], 1.75), (ids["H"], ids["D"], 1.15), (ids["A"], ids["C"], 1.5), (ids["A"], ids["D"], 0.9),
        (ids["a1"], ids["a2"], 2.0),
    ]
    # margin 1.2 drops H-D (1.15) and A-D (.9)
    assert len(step_pairs(t, ExtractConfig(min_margin=1.2, **NO_EDIT))) == 3
    # the default (rStar) margin 0.5 keeps all five; sides of two each, so every pair counts 2 x 2
    # except a1-a2 (one candidate each: 1 x 1)
    default = step_pairs(t, ExtractConfig(**NO_EDIT))
    assert [(p.pos_count, p.neg_count) for p in default] == [(2, 2)] * 4 + [(1, 1)]
    p = pairs[-1]
    assert p.prefix == "# A\nA = 1\n<end_of_step>\n" and p.question == "What?" and p.depth == 2 and p.kind == "step"
    assert p.chosen == "# a1\n\\boxed{a1}\n<end_of_answer>\n" and (p.q_chosen, p.q_rejected) == (1.0, -1.0)


def test_sft_picks_top_correct_trajectories_by_mean_then_min_q():
    t, ids = _tree()
    # means: a1 (.5 + 1)/2 = .75 ; h1 (.75 + .5)/2 = .625, min .5 ; b1 (.25 + 1)/2 = .625, min .25 ; f1 .55
    rows = sft_records(t, ExtractConfig(sft_top_n=2))
    assert [(r.leaf_id, r.q_mean, r.q_min) for r in rows] == [(ids["a1"], 0.75, 0.5), (ids["h1"], 0.625, 0.5)]
    assert rows[0].completion == "# A\nA = 1\n<end_of_step>\n# a1\n\\boxed{a1}\n<end_of_answer>\n"
    assert (rows[0].question, rows[0].prefix, rows[0].round, rows[0].n_steps) == ("What?", "", 2, 2)
    assert len(sft_records(t, ExtractConfig(sft_top_n=3))) == 3 and sft_records(t, ExtractConfig(sft_top_n=0)) == []


def test_final_pairs_whole_trajectories():
    t, ids = _tree()
    # correct by mean: a1 .75, h1 .625 (min .5) | wrong by mean, lowest first: c1 -1, d1 (-.4 - 1)/2 = -.7
    pairs = final_pairs(t, ExtractConfig(min_margin=0.7, **NO_EDIT))
    got = [(p.chosen_id, p.rejected_id, round(p.margin, 6)) for p in pairs]
    assert got == [(ids["a1"], ids["c1"], 1.75), (ids["a1"], ids["d1"], 1.45), (ids["h1"], ids["c1"], 1.625),
                   (ids["h1"], ids["d1"], 1.325)]
    assert all(p.kind == "final" and p.prefix == "" and p.depth == 0 for p in pairs)
    assert pairs[0].rejected == "# C\nC = 1\n<end_of_step>\n# c1\n\\boxed{c1}\n<end_of_answer>\n"


def test_one_candidate_on_a_side_widens_the_other_to_four():
    r"""root: one correct-leading child P (Q .9) against five wrong-leading W1..W5 (Q -1, -.9, -.8, -.7, -.6)."""
    t = Tree(TreeInfo("w", "Q?", "x", 1, "terminal", 1.0, 0))
    pos = _add(t, 0, "P", 0.9)
    _add(t, pos, "p1", 1.0, "terminal", "correct")
    negs = []
    for i, q in enumerate([-1.0, -0.9, -0.8, -0.7, -0.6]):
        negs.append(_add(t, 0, f"W{i}", q))
        _add(t, negs[-1], f"w{i}", -1.0, "terminal", "wrong")
    pairs = step_pairs(t, ExtractConfig(**NO_EDIT))
    # len(chosen) == 1 -> rejected = the 4 lowest: W0..W3; margins .9 + 1 = 1.9, 1.8, 1.7, 1.6 (W4 not taken)
    assert [(p.rejected_id, round(p.margin, 6), p.pos_count, p.neg_count) for p in pairs] == [
        (negs[0], 1.9, 1, 4), (negs[1], 1.8, 1, 4), (negs[2], 1.7, 1, 4), (negs[3], 1.6, 1, 4)]
    assert len(step_pairs(t, ExtractConfig(pair_widen_k=2, **NO_EDIT))) == 2  # no widening beyond top-2


def test_a_pair_needs_the_chosen_continuation_to_score_higher():
    r"""root: X (Q .6) -> x1 correct (Q .2, its only correct-leading child) ; Y (Q 0) -> y1 wrong (Q 1 set by hand)."""
    t = Tree(TreeInfo("c", "Q?", "x", 1, "terminal", 1.0, 0))
    x = _add(t, 0, "X", 0.6)
    _add(t, x, "x1", 0.2, "terminal", "correct")
    y = _add(t, 0, "Y", 0.0)
    _add(t, y, "y1", 1.0, "terminal", "wrong")
    # margin .6 - 0 = .6 >= .5, but continuations: X (.6 + .2)/2 = .4 <= Y (0 + 1)/2 = .5 -> dropped
    assert step_pairs(t, ExtractConfig(**NO_EDIT)) == []


def test_edit_distance_by_hand_and_the_20_character_filter():
    assert edit_distance("kitten", "sitting", 10) == 3  # k->s, e->i, +g
    assert edit_distance("kitten", "sitting", 2) == 2  # capped
    assert edit_distance("", "abc", 5) == 3 and edit_distance("abc", "abc", 5) == 0
    assert edit_distance("\\boxed{7}", "\\boxed{8}", 20) == 1
    t = Tree(TreeInfo("e", "Q?", "7", 1, "terminal", 1.0, 0))
    a = t.add_child(t.new_id(), 0, parse_step("# The answer is \\boxed{7}"), "", "terminal", "correct")
    b = t.add_child(t.new_id(), 0, parse_step("# The answer is \\boxed{8}"), "", "terminal", "wrong")
    a.visits, a.value_sum, b.visits, b.value_sum = 1, 1.0, 1, -1.0
    # margin 2, but the rendered steps differ in one character (< 20): no pair, step or final
    assert extract(t, ExtractConfig()).pairs == []
    assert len(extract(t, ExtractConfig(**NO_EDIT)).pairs) == 2  # step + final pair without the filter


def test_step_labels_cover_every_finished_trajectory():
    t, ids = _tree()
    labels = step_labels(t)
    # 8 terminals + 1 dead end
    assert len(labels) == 9
    by_leaf = {r.leaf_id: r for r in labels}
    assert by_leaf[ids["d1"]].labels == pytest.approx((-0.4, -1.0)) and by_leaf[ids["d1"]].outcome == "wrong"
    assert by_leaf[ids["E"]].labels == (-1.0,) and by_leaf[ids["E"]].outcome == "dead"
    assert by_leaf[ids["a1"]].completions == ("# A\nA = 1\n<end_of_step>\n", "# a1\n\\boxed{a1}\n<end_of_answer>\n")


def test_export_rows_match_the_schemas_exactly():
    t, _ = _tree()
    data = extract(t, ExtractConfig(**NO_EDIT))
    for records, schema in [(data.sft, SFT_SCHEMA), (data.pairs, PPM_PAIRS_SCHEMA), (data.steps, STEPS_SCHEMA)]:
        rows = [export_row(r, prompt=f"<chat>{r.question}</chat>{r.prefix}") for r in records]
        assert rows and set(rows[0]) == set(schema.names)
        table = pa.Table.from_pylist(rows, schema=schema)
        assert table.num_rows == len(records)
    assert {p.kind for p in data.pairs} == {"step", "final"}
    labels = pa.Table.from_pylist([export_row(r, "p") for r in data.steps], schema=STEPS_SCHEMA)["labels"]
    assert labels.type == pa.list_(pa.float32())
