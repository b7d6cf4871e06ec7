import math
import random

import pytest

from mcts.node import Node
from mcts.qvalues import backup, effective_visits, q_value
from mcts.uct import select_child, uct_score


def _node(i, parent=0, visits=0, value_sum=0.0, prior=None, closed=False):
    return Node(id=i, parent=parent, depth=1, visits=visits, value_sum=value_sum, prior=prior, closed=closed)


def test_q_value_without_and_with_prior():
    assert q_value(_node(1), 1.0) == 0.0  # no visits, no prior
    assert q_value(_node(1, visits=3, value_sum=1.0), 1.0) == pytest.approx(1 / 3)  # W/N = 1/3
    # PPM prior 0.5 worth w=1 visit: (1 + 1*0.5) / (3 + 1) = 0.375
    assert q_value(_node(1, visits=3, value_sum=1.0, prior=0.5), 1.0) == pytest.approx(0.375)
    # w=2: (1 + 2*0.5) / (3 + 2) = 0.4
    assert q_value(_node(1, visits=3, value_sum=1.0, prior=0.5), 2.0) == pytest.approx(0.4)
    # prior only: Q = p
    assert q_value(_node(1, prior=-0.3), 1.0) == pytest.approx(-0.3)
    assert effective_visits(_node(1, visits=2, prior=0.1), 1.5) == 3.5  # 2 + 1.5


def test_backup_adds_each_outcome_once_along_the_path():
    nodes = {0: Node(0, -1, 0), 1: _node(1, 0), 2: _node(2, 1), 3: _node(3, 0)}
    assert backup(nodes, 2, 1.0) == 3  # 2 -> 1 -> 0
    backup(nodes, 1, -1.0)
    backup(nodes, 3, -1.0)
    # root saw +1, -1, -1: N=3, W=-1; node 1 saw +1, -1: N=2, W=0; node 2 saw +1; node 3 saw -1
    assert [(nodes[i].visits, nodes[i].value_sum) for i in range(4)] == [(3, -1.0), (2, 0.0), (1, 1.0), (1, -1.0)]
    with pytest.raises(ValueError, match=r"reward=1.5: must be a number in \[-1, 1\]"):
        backup(nodes, 1, 1.5)


def test_uct_score_by_hand():
    # 0.5 + 2 * sqrt(ln 8 / 2) = 0.5 + 2 * sqrt(2.07944 / 2) = 0.5 + 2 * 1.019667 = 2.539334
    assert uct_score(0.5, 2, 8, 2.0, "zero") == pytest.approx(2.539334, abs=1e-6)
    assert uct_score(0.5, 2, 1, 2.0, "zero") == 0.5  # ln 1 = 0: no exploration yet
    assert uct_score(0.5, 2, 0, 2.0, "zero") == 0.5  # parent without visits: never ln 0
    assert uct_score(0.0, 0, 8, 2.0, "zero") == 0.0  # unvisited, rStar-Math: scored 0
    assert uct_score(0.0, 0, 8, 2.0, "inf") == math.inf  # unvisited, classic


def _family(a, b, c=None):
    parent = Node(0, -1, 0, visits=4, value_sum=0.0)
    nodes = {0: parent, 1: a, 2: b}
    parent.children = [1, 2]
    if c is not None:
        nodes[3] = c
        parent.children.append(3)
    return nodes, parent


def test_select_child_by_hand():
    a = _node(1, visits=3, value_sum=1.0)  # Q = 1/3
    b = _node(2, visits=1, value_sum=-1.0)  # Q = -1
    nodes, parent = _family(a, b)
    rng = random.Random(0)
    # c=2: A = 1/3 + 2*sqrt(ln4/3) = 0.3333 + 2*0.67978 = 1.6929;  B = -1 + 2*sqrt(ln4/1) = -1 + 2*1.17741 = 1.3548
    assert select_child(nodes, parent, 2.0, "zero", 1.0, rng) == 1
    # c=4: A = 0.3333 + 4*0.67978 = 3.0525;  B = -1 + 4*1.17741 = 3.7096  -> exploration wins
    assert select_child(nodes, parent, 4.0, "zero", 1.0, rng) == 2


def test_virtual_loss_counts_extra_visits_that_each_returned_minus_one():
    a = _node(1, visits=3, value_sum=1.0)  # Q = 1/3
    b = _node(2, visits=1, value_sum=-1.0)  # Q = -1
    nodes, parent = _family(a, b)
    rng = random.Random(0)
    assert select_child(nodes, parent, 2.0, "zero", 1.0, rng, virtual={}) == 1  # as without (by hand above)
    # One rollout already went through A (and the parent): A counts N = 4, W = 0, the parent N = 5.
    # A = 0 + 2*sqrt(ln5/4) = 1.2686;  B = -1 + 2*sqrt(ln5/1) = 1.5372  -> B
    assert select_child(nodes, parent, 2.0, "zero", 1.0, rng, virtual={0: 1, 1: 1}) == 2
    # An unvisited child under 'zero' scores 0 until a virtual loss gives it N = 1, Q = -1.
    c, d = _node(1), _node(2)
    nodes, parent = _family(c, d)
    assert select_child(nodes, parent, 0.0, "zero", 1.0, rng, virtual={1: 1}) == 2
    assert select_child(nodes, parent, 0.0, "zero", 1.0, rng, virtual={2: 1}) == 1


def test_unvisited_children_zero_versus_inf():
    a = _node(1, visits=3, value_sum=1.0)  # Q = 1/3
    b = _node(2, visits=1, value_sum=-1.0)
    c = _node(3)  # unvisited
    nodes, parent = _family(a, b, c)
    rng = random.Random(0)
    # zero: C scores 0 < A's 1.6929 -> A (exploit the high-Q branch first)
    assert select_child(nodes, parent, 2.0, "zero", 1.0, rng) == 1
    assert select_child(nodes, parent, 2.0, "inf", 1.0, rng) == 3  # inf: try C first
    # c=0 and A's Q = -0.5: A scores -0.5, B -1, unvisited C 0 -> C
    a.value_sum = -1.5
    assert select_child(nodes, parent, 0.0, "zero", 1.0, rng) == 3


def test_prior_makes_a_new_child_one_visit_worth_its_ppm_score():
    a = _node(1, prior=0.6)  # Q = 0.6 with n = 1
    b = _node(2, prior=-0.2)
    nodes, parent = _family(a, b)
    parent.visits = 0  # fresh parent: ln term 0, so UCT = Q: 0.6 > -0.2
    assert select_child(nodes, parent, 2.0, "zero", 1.0, random.Random(0)) == 1


def test_closed_children_are_skipped_and_ties_use_the_rng():
    a, b, c = _node(1), _node(2), _node(3, visits=5, value_sum=5.0, closed=True)
    nodes, parent = _family(a, b, c)
    picks = {select_child(nodes, parent, 2.0, "zero", 1.0, random.Random(s)) for s in range(20)}
    assert picks == {1, 2}  # a tie between the two open unvisited children; the closed Q=1 child never
    assert select_child(nodes, parent, 2.0, "zero", 1.0, random.Random(3)) == select_child(
        nodes, parent, 2.0, "zero", 1.0, random.Random(3)
    )
    a.closed = b.closed = True
    assert select_child(nodes, parent, 2.0, "zero", 1.0, random.Random(0)) is None
