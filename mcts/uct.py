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


def select_child(
    nodes: Mapping[int, Node],
    parent: Node,
    c: float,
    unvisited: str,
    prior_weight: float,
    rng: random.Random,
) -> int | None:
    """Id of the open child of ``parent`` with the highest UCT (ties: ``rng``); None if none is open."""
    n_parent = effective_visits(parent, prior_weight)
    best: list[int] = []
    best_score = -math.inf
    for cid in parent.children:
        child = nodes[cid]
        if child.closed:
            continue
        score = uct_score(q_value(child, prior_weight), effective_visits(child, prior_weight), n_parent, c, unvisited)
        if score > best_score:
            best, best_score = [cid], score
        elif score == best_score:
            best.append(cid)
    if not best:
        return None
    return best[0] if len(best) == 1 else rng.choice(best)
