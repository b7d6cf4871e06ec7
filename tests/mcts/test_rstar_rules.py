"""rStar-Math's data rules on one hand-built tree, in a terminal round and in a PPM round.

The outcomes are recorded with the search's own functions (``backup`` for a terminal, ``record`` for a dead
end) and the PPM priors set as the search sets them (non-terminal nodes only); every Q, SFT pick and pair
below is computed by hand in the comments.

    root
    ├─ A  "apples"                 ├─ A1 \\boxed{60} correct   ├─ A2 \\boxed{61} wrong   └─ A3 dead (depth limit)
    ├─ B  "price x count"          └─ B1 \\boxed{60} correct
    ├─ C  "guess a square"         ├─ C1 \\boxed{49} wrong     └─ C2 \\boxed{50} wrong
    └─ D  dead (its expansions failed)
"""

import pytest

from mcts.config import ExtractConfig
from mcts.extract import extract
from mcts.qvalues import backup, q_value, record
from mcts.steps import parse_step
from mcts.tree import Tree, TreeInfo

TEXTS = {
    "A": "# Let x be the number of apples\nx = 3 * 4\nprint(x)",
    "B": "# Multiply the price by the count\ncost = 12 * 5\nprint(cost)",
    "C": "# Guess that the total is a square\nguess = 7 ** 2",
    "D": "# Try dividing first\nq = 60 / 0",
    "A1": "# The answer is \\boxed{60}",
    "A2": "# The answer is \\boxed{61}",  # one character from A1: never a pair with it
    "A3": "# Keep going without an answer\ny = x + 1",
    "B1": "# So the total cost is \\boxed{60}",
    "C1": "# Hence the answer is \\boxed{49}",
    "C2": "# Then it must be \\boxed{50}",
}


def _tree(mode, priors):
    t = Tree(TreeInfo("h", "What is 12 * 5?", "60", 3 if mode == "ppm" else 1, mode, 1.0, 0))
    ids = {}

    def add(name, parent, status="open", verdict=""):
        node = t.add_child(t.new_id(), ids.get(parent, 0), parse_step(TEXTS[name]), "", status, verdict)
        node.prior = priors.get(name)  # the search scores open nodes only (rStar-Math)
        ids[name] = node.id
        return node

    for name in "ABCD":
        add(name, None)
    for name, parent, verdict in [("A1", "A", "correct"), ("A2", "A", "wrong"), ("B1", "B", "correct"),
                                  ("C1", "C", "wrong"), ("C2", "C", "wrong")]:
        add(name, parent, "terminal", verdict)
        backup(t.nodes, ids[name], 1.0 if verdict == "correct" else -1.0)
    add("A3", "A", "dead")
    record(t.nodes[ids["A3"]], -1.0)
    t.make_dead(ids["D"], -1.0)
    record(t.nodes[ids["D"]], -1.0)
    return t, ids


def _q(t, ids):
    return {name: round(q_value(t.nodes[i], 1.0), 6) for name, i in ids.items()}


def test_terminal_round_q_values_sft_and_pairs():
    t, ids = _tree("terminal", {})
    # A: A1 +1, A2 -1 -> N 2, W 0, Q 0;  B: B1 +1 -> Q 1;  C: C1 -1, C2 -1 -> N 2, W -2, Q -1;
    # A3, D: dead ends, -1 at the node only -> Q -1 each; terminals: +1 / -1
    assert _q(t, ids) == {"A": 0.0, "B": 1.0, "C": -1.0, "D": -1.0, "A1": 1.0, "A2": -1.0, "B1": 1.0,
                          "C1": -1.0, "C2": -1.0, "A3": -1.0}
    # root W = sum of the terminals' W = 1 - 1 + 1 - 1 - 1 = -1 over N = 5 (the dead ends are not in it)
    assert (t.root.visits, t.root.value_sum) == (5, -1.0)
    ex = extract(t, ExtractConfig())
    # SFT, by mean step Q: B -> B1 (1 + 1)/2 = 1.0 ; A -> A1 (0 + 1)/2 = 0.5
    assert [(r.leaf_id, r.q_mean) for r in ex.sft] == [(ids["B1"], 1.0), (ids["A1"], 0.5)]
    # Step pairs at the root: correct-leading A (0), B (1) -> [B, A]; wrong-leading A (0), C (-1) -> [C, A].
    #   B-C: margin 2; continuations B -> B1 1.0 > C -> C1 (-1 - 1)/2 = -1         kept
    #   B-A: margin 1; B 1.0 > A -> A2 (0 - 1)/2 = -0.5                              kept
    #   A-C: margin 1; A -> A1 (0 + 1)/2 = 0.5 > -1                                  kept
    #   A-A: margin 0                                                                dropped
    # At A: A1 vs A2, margin 2, but the steps are 1 character apart (< 20)         dropped
    step = [(p.chosen_id, p.rejected_id, round(p.margin, 6), p.pos_count, p.neg_count)
            for p in ex.pairs if p.kind == "step"]
    assert step == [(ids["B"], ids["C"], 2.0, 2, 2), (ids["B"], ids["A"], 1.0, 2, 2), (ids["A"], ids["C"], 1.0, 2, 2)]
    # Final pairs: correct B1 (1.0), A1 (.5) vs the two lowest wrong: C1 (-1), C2 (-1) (A2's mean is -.5)
    #   B1-C1 = B1-C2 = 1 + 1 = 2 ; A1-C1 = A1-C2 = .5 + 1 = 1.5
    final = [(p.chosen_id, p.rejected_id, round(p.margin, 6)) for p in ex.pairs if p.kind == "final"]
    assert final == [(ids["B1"], ids["C1"], 2.0), (ids["B1"], ids["C2"], 2.0), (ids["A1"], ids["C1"], 1.5),
                     (ids["A1"], ids["C2"], 1.5)]


def test_ppm_round_q_values_sft_and_pairs():
    # The PPM scored the four open steps when they were created; terminals and A3 (dead at creation) never.
    t, ids = _tree("ppm", {"A": 0.9, "B": -0.8, "C": 0.6, "D": 0.3})
    # Q = (W + p) / (N + 1):  A (0 + .9)/3 = .3 ; B (1 - .8)/2 = .1 ; C (-2 + .6)/3 = -.466667 ;
    # D (-1 + .3)/2 = -.35 ; terminals exactly +1 / -1 ; A3 -1
    assert _q(t, ids) == {"A": 0.3, "B": 0.1, "C": -0.466667, "D": -0.35, "A1": 1.0, "A2": -1.0, "B1": 1.0,
                          "C1": -1.0, "C2": -1.0, "A3": -1.0}
    assert (t.root.visits, t.root.value_sum) == (5, -1.0)
    ex = extract(t, ExtractConfig())
    # SFT: A -> A1 (.3 + 1)/2 = .65 now beats B -> B1 (.1 + 1)/2 = .55 (the terminal round had B first)
    assert [(r.leaf_id, round(r.q_mean, 6)) for r in ex.sft] == [(ids["A1"], 0.65), (ids["B1"], 0.55)]
    # Step pairs at the root: correct-leading [A .3, B .1]; wrong-leading [C -.466667, A .3].
    #   A-C: margin .3 + .466667 = .766667; A -> A1 .65 > C -> C1 (-.466667 - 1)/2 = -.733333   kept
    #   A-A: margin 0                                                                           dropped
    #   B-C: margin .1 + .466667 = .566667 >= .5; B -> B1 .55 > -.733333                        kept
    #   B-A: margin .1 - .3 = -.2                                                               dropped
    # At A: A1 vs A2 is < 20 characters apart                                                   dropped
    step = [(p.chosen_id, p.rejected_id, round(p.margin, 6), p.pos_count, p.neg_count)
            for p in ex.pairs if p.kind == "step"]
    assert step == [(ids["A"], ids["C"], 0.766667, 2, 2), (ids["B"], ids["C"], 0.566667, 2, 2)]
    # A margin of 0.6 (the old 0.1 default would have kept more) drops B-C at .566667
    assert len([p for p in extract(t, ExtractConfig(min_margin=0.6)).pairs if p.kind == "step"]) == 1
    # Final pairs: A1 (.65), B1 (.55) vs C1, C2 (mean -.733333 each; A2's is (.3 - 1)/2 = -.35)
    #   A1-C* = .65 + .733333 = 1.383333 ; B1-C* = .55 + .733333 = 1.283333
    final = [(p.chosen_id, p.rejected_id, round(p.margin, 6)) for p in ex.pairs if p.kind == "final"]
    assert final == [(ids["A1"], ids["C1"], 1.383333), (ids["A1"], ids["C2"], 1.383333),
                     (ids["B1"], ids["C1"], 1.283333), (ids["B1"], ids["C2"], 1.283333)]
    labels = {r.leaf_id: r.labels for r in ex.steps}
    assert labels[ids["C1"]] == pytest.approx((-0.466667, -1.0), abs=1e-6)
