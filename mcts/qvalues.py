"""Q-values: the value of a step, from backed-up outcomes and (in PPM modes) the PPM's prior.

    Q(s) = (W(s) + w * p(s)) / (N(s) + w)     with a prior p(s) (PPM modes), weight w = prior_weight
    Q(s) = W(s) / N(s)                         without one; 0 while N(s) = 0

W(s) is the sum and N(s) the count of outcomes recorded at or backed up through s. A terminal's reward
(+1 correct / -1 wrong from the grader; its PPM score in test-time search) is added once to every node on
the path from the root to the terminal (``backup``; rStar-Math's ``update_recursive``). A dead end's -1 is
recorded at the dead node only (``record``; rStar-Math's ``node.update`` in rstar_deepthink/agents/mcts.py,
``SearchConfig.dead_end_backup="node"``), so every ancestor's W is the sum of the W of the terminals below it. The prior enters as w
virtual visits of value p(s), so rollouts outweigh it as N grows. Every value lies in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mcts.node import NO_PARENT, Node

CORRECT_REWARD = 1.0
WRONG_REWARD = -1.0
DEAD_END_REWARD = -1.0


def effective_visits(node: Node, prior_weight: float) -> float:
    """N(s) plus the prior's weight when the node has a prior: the visit count UCT explores against."""
    return node.visits + (prior_weight if node.prior is not None else 0.0)


def q_value(node: Node, prior_weight: float) -> float:
    """Q(s) as in the module doc; 0.0 for a node with neither visits nor prior."""
    n = effective_visits(node, prior_weight)
    if n == 0:
        return 0.0
    w = node.value_sum + (prior_weight * node.prior if node.prior is not None else 0.0)
    return w / n


def check_unit(value: float, what: str) -> float:
    """``value`` as a float, or ValueError when it is NaN or outside [-1, 1] (a reward or a PPM score)."""
    v = float(value)
    if math.isnan(v) or not (-1.0 <= v <= 1.0):
        raise ValueError(f"{what}={value!r}: must be a number in [-1, 1] (PPM scores are tanh outputs)")
    return v


def record(node: Node, reward: float) -> None:
    """Add one outcome ``reward`` to ``node`` alone (a dead end under rStar-Math's rule)."""
    check_unit(reward, "reward")
    node.visits += 1
    node.value_sum += reward


def backup(nodes: Mapping[int, Node], node_id: int, reward: float) -> int:
    """Add one outcome ``reward`` to ``node_id`` and each ancestor up to the root; returns the path length."""
    check_unit(reward, "reward")
    n = 0
    i = node_id
    while i != NO_PARENT:
        node = nodes[i]
        node.visits += 1
        node.value_sum += reward
        i = node.parent
        n += 1
    return n
