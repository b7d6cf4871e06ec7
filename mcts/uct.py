"""Selection: the UCT rule and the child it picks.

    UCT(s) = Q(s) + c * sqrt(ln n(parent) / n(s))

n(.) are effective visits (``mcts.qvalues.effective_visits``: backed-up outcomes plus the prior's weight
in PPM modes), c is ``SearchConfig.c_puct``. ln n(parent) is taken as 0 while n(parent) <= 1, so the
exploration term vanishes until the parent has seen two outcomes (and ln never sees 0).

A child with n(s) = 0 is *unvisited*; ``unvisited`` says how it scores: 'zero' (rStar-Math, the default)
scores it 0, so a visited sibling whose UCT is above 0 is preferred and high-Q branches are explored
first; 'inf' tries every child once before revisiting any (classic UCT). With a PPM prior no child is
unvisited: it starts at Q = its prior with n = w.

Only open children compete (closed ones can yield nothing new); exact ties are broken by the tree's
seeded ``random.Random`` so a search is reproducible but not biased towards the first-generated child.

Virtual loss (``SearchConfig.parallel_rollouts`` > 1): while several rollouts of one tree are chosen together,
each node on a path already chosen counts, for the choices after it, ``virtual[id]`` extra visits that each
returned -1 (the worst outcome), so the next rollout is steered to other branches until the real outcomes are in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from mcts.node import Node
from mcts.qvalues import effective_visits, q_value


def uct_score(q: float, n: float, n_parent: float, c: float, unvisited: str) -> float:
    """UCT of a child with value ``q`` and effective visits ``n`` under a parent with ``n_parent``."""
    if n <= 0:
        return math.inf if unvisited == "inf" else 0.0
    log_parent = math.log(n_parent) if n_parent > 1 else 0.0
    return q + c * math.sqrt(log_parent / n)


def _with_virtual_loss(node: Node, prior_weight: float, losses: int) -> tuple[float, float]:
    """(Q, effective visits) of ``node`` as if ``losses`` more outcomes of -1 had been backed up through it."""
    n = effective_visits(node, prior_weight)
    if not losses:
        return q_value(node, prior_weight), n
    return (q_value(node, prior_weight) * n - losses) / (n + losses), n + losses


def select_child(
    nodes: Mapping[int, Node],
    parent: Node,
    c: float,
    unvisited: str,
    prior_weight: float,
    rng: random.Random,
    virtual: Mapping[int, int] | None = None,
) -> int | None:
    """Id of the open child of ``parent`` with the highest UCT (ties: ``rng``); None if none is open.
    ``virtual``: node id -> virtual losses (module doc); None or empty = none."""
    virtual = virtual or {}
    n_parent = _with_virtual_loss(parent, prior_weight, virtual.get(parent.id, 0))[1]
    best: list[int] = []
    best_score = -math.inf
    for cid in parent.children:
        child = nodes[cid]
        if child.closed:
            continue
        q, n = _with_virtual_loss(child, prior_weight, virtual.get(cid, 0))
        score = uct_score(q, n, n_parent, c, unvisited)
        if score > best_score:
            best, best_score = [cid], score
        elif score == best_score:
            best.append(cid)
    if not best:
        return None
    return best[0] if len(best) == 1 else rng.choice(best)
