"""Training data out of a finished tree: SFT trajectories, PPM preference pairs, step labels.

Records keep the question and the rendered step prefix apart (``question``, ``prefix``): the pipeline's
export turns them into one chat-templated ``prompt`` with the model's prompt builder, so training and
inference see identical text. Steps are rendered exactly as the policy sees them (``mcts.steps``).

The rules are rStar-Math's (paper arXiv 2501.04519, and the released code on branch
``rStar-math`` of microsoft/rStar); Q from ``mcts.qvalues.q_value``; a trajectory is the path root -> a terminal:
- a trajectory's score is the mean Q of its steps, ties broken by the min step Q (then by node id);
- a node *leads to a correct answer* when its subtree holds a correct terminal, and *to a wrong one* when
  it holds a wrong terminal (dead ends count as neither); a node can do both (extra_rm_file.py,
  ``search_all_traces``: ``final_correct`` / ``final_wrong``);
- SFT (the paper; extra_sft_file.py lists the traces with their Q): the ``sft_top_n`` best correct
  trajectories;
- step pairs (extra_rm_file.py, ``search_all_traces``): at every node with children of both kinds, the
  ``pair_top_k`` highest-Q correct-leading children (chosen) and the ``pair_top_k`` lowest-Q wrong-leading
  ones (rejected); when one side has a single candidate the other widens to ``pair_widen_k``. Every
  combination is a candidate pair when its Q margin is > 0 and the chosen step's greedy continuation
  (``continuation_mean``) scores higher than the rejected one's; the prompt is the question plus the
  shared prefix;
- final pairs (the paper's relaxation at the last step, where siblings rarely share a prefix): the
  ``pair_top_k`` best correct trajectories against the ``pair_top_k`` worst wrong ones by mean Q, as whole
  solutions after the bare question (prefix '', depth 0);
- pair filters (train/sample_rm_data.py): a pair is kept when its margin is >= ``min_margin`` (0.5) and its
  two rendered sides are >= ``min_edit_distance`` (20) characters apart by Levenshtein distance;
- each pair carries ``pos_count`` / ``neg_count``, the sizes of the two sides it was drawn from, for rStar's
  loss weight 1 / (pos_count * neg_count) (train/rm.py, ``preprocess_value_dataset``);
- step labels: every trajectory to a terminal or a dead end, each step with its Q in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mcts.behaviours import path_behaviours, prefer_behaviours
from mcts.config import ExtractConfig
from mcts.node import ROOT_ID, Node
from mcts.qvalues import q_value
from mcts.tree import Tree, render_node


@dataclass(frozen=True)
class SFTRecord:
    problem_id: str
    round: int
    question: str
    prefix: str  # '' : a whole solution from the question
    completion: str
    q_mean: float
    q_min: float
    n_steps: int
    leaf_id: int
    behaviours: tuple[str, ...] = ()  # mcts.behaviours tags of the trajectory


@dataclass(frozen=True)
class PairRecord:
    problem_id: str
    round: int
    question: str
    prefix: str  # rendered steps shared by both sides ('' for final pairs)
    chosen: str
    rejected: str
    q_chosen: float
    q_rejected: float
    margin: float  # q_chosen - q_rejected, >= min_margin
    kind: str  # 'step' | 'final'
    depth: int  # depth of the compared steps; 0 for final pairs (whole solutions)
    chosen_id: int
    rejected_id: int
    pos_count: int  # chosen-side candidates this pair was drawn from (after widening)
    neg_count: int  # rejected-side candidates


@dataclass(frozen=True)
class StepsRecord:
    problem_id: str
    round: int
    question: str
    prefix: str  # always '': the steps start at the question
    completions: tuple[str, ...]  # one rendered step each
    labels: tuple[float, ...]  # the Q of each step, in [-1, 1]
    outcome: str  # the leaf's verdict ('correct' / 'wrong' / 'ungraded') or 'dead'
    leaf_id: int


@dataclass(frozen=True)
class Trajectory:
    leaf_id: int
    nodes: tuple[Node, ...]
    q_mean: float
    q_min: float

    @property
    def text(self) -> str:
        return "".join(render_node(n) for n in self.nodes)


@dataclass(frozen=True)
class Extracted:
    sft: list[SFTRecord]
    pairs: list[PairRecord]
    steps: list[StepsRecord]


def trajectory(tree: Tree, leaf_id: int) -> Trajectory:
    nodes = tuple(tree.path(leaf_id))
    if not nodes:
        raise ValueError(f"tree {tree.info.problem_id}: the root is not a trajectory")
    qs = [q_value(n, tree.info.prior_weight) for n in nodes]
    return Trajectory(leaf_id, nodes, sum(qs) / len(qs), min(qs))


def _best_first(t: Trajectory) -> tuple[float, float, int]:
    return (-t.q_mean, -t.q_min, t.leaf_id)


def _worst_first(t: Trajectory) -> tuple[float, float, int]:
    return (t.q_mean, t.q_min, t.leaf_id)


def leads_to(tree: Tree) -> dict[int, tuple[bool, bool]]:
    """node id -> (leads to a correct answer, leads to a wrong one) as defined in the module doc.

    One pass in decreasing id order: children have larger ids than their parents, so each node's
    flags are final before they are folded into its parent's.
    """
    correct: dict[int, bool] = {}
    wrong: dict[int, bool] = {}
    for i in sorted(tree.nodes, reverse=True):
        node = tree.nodes[i]
        correct[i] = correct.get(i, False) or node.verdict == "correct"
        wrong[i] = wrong.get(i, False) or node.verdict == "wrong"
        if node.parent >= 0:
            correct[node.parent] = correct.get(node.parent, False) or correct[i]
            wrong[node.parent] = wrong.get(node.parent, False) or wrong[i]
    return {i: (correct[i], wrong[i]) for i in tree.nodes}


def edit_distance(a: str, b: str, cap: int) -> int:
    """Levenshtein distance of ``a`` and ``b`` (unit-cost insert, delete, substitute), capped at ``cap``:
    ``min(distance, cap)``. Only cells within ``cap`` of the diagonal can hold a value below ``cap``, so
    the cost is O(len * cap), not O(len(a) * len(b)), for long whole-solution pairs."""
    if cap <= 0:
        return 0
    n, m = len(a), len(b)
    if abs(n - m) >= cap:
        return cap
    # prev[j] = D[i-1][j] for j in the band; cells outside the band count as cap.
    prev = {j: j for j in range(0, min(m, cap) + 1)}
    for i in range(1, n + 1):
        lo, hi = max(0, i - cap + 1), min(m, i + cap - 1)
        cur: dict[int, int] = {}
        if lo == 0:
            cur[0] = i
        for j in range(max(1, lo), hi + 1):
            sub = prev.get(j - 1, cap) + (a[i - 1] != b[j - 1])
            cur[j] = min(sub, prev.get(j, cap) + 1, cur.get(j - 1, cap) + 1, cap)
        if min(cur.values(), default=cap) >= cap:
            return cap
        prev = cur
    return min(prev.get(m, cap), cap)


def continuation_mean(tree: Tree, node: Node, flags: dict[int, tuple[bool, bool]], best: bool) -> float:
    """Mean Q of ``node`` and its greedy continuation: repeatedly the highest-Q child leading to a correct
    answer (``best``) or the lowest-Q child leading to a wrong one (rStar: extra_rm_file.py,
    ``build_partial_solution``)."""
    w = tree.info.prior_weight
    qs = [q_value(node, w)]
    while True:
        side = 0 if best else 1
        nxt = [tree.nodes[c] for c in node.children if flags[c][side]]
        if not nxt:
            return sum(qs) / len(qs)
        node = max(nxt, key=lambda n: (q_value(n, w), -n.id)) if best else min(nxt, key=lambda n: (q_value(n, w), n.id))
        qs.append(q_value(node, w))


def _apart(chosen: str, rejected: str, cfg: ExtractConfig) -> bool:
    """rStar's pair filter (train/sample_rm_data.py): the two sides differ by >= min_edit_distance characters."""
    return edit_distance(chosen, rejected, cfg.min_edit_distance) >= cfg.min_edit_distance


def _sides(good: list, bad: list, cfg: ExtractConfig) -> tuple[list, list]:
    """The top-k of each (sorted) side; the other side widens to ``pair_widen_k`` when one has a single
    candidate (extra_rm_file.py: ``if len(chosen_nodes) == 1: rejected_nodes = rejected_candidates[:4]``,
    then the same for the chosen side)."""
    pos, neg = good[: cfg.pair_top_k], bad[: cfg.pair_top_k]
    if len(pos) == 1:
        neg = bad[: cfg.pair_widen_k]
    if len(neg) == 1:
        pos = good[: cfg.pair_widen_k]
    return pos, neg


def sft_records(tree: Tree, cfg: ExtractConfig) -> list[SFTRecord]:
    trajs = sorted((trajectory(tree, n.id) for n in tree.terminals() if n.verdict == "correct"), key=_best_first)
    info = tree.info
    tags = {t.leaf_id: tuple(path_behaviours(t.nodes, info.question)) for t in trajs}
    trajs = prefer_behaviours(trajs, lambda t: tags[t.leaf_id], cfg.prefer_behaviours)  # no-op unless configured
    return [
        SFTRecord(info.problem_id, info.round, info.question, "", t.text, t.q_mean, t.q_min, len(t.nodes), t.leaf_id,
                  tags[t.leaf_id])
        for t in trajs[: cfg.sft_top_n]
    ]


def step_pairs(tree: Tree, cfg: ExtractConfig) -> list[PairRecord]:
    flags = leads_to(tree)
    w = tree.info.prior_weight
    info = tree.info
    out: list[PairRecord] = []
    for node in tree.nodes.values():
        good = [tree.nodes[c] for c in node.children if flags[c][0]]
        bad = [tree.nodes[c] for c in node.children if flags[c][1]]
        if not good or not bad:
            continue
        good.sort(key=lambda n: (-q_value(n, w), n.id))
        bad.sort(key=lambda n: (q_value(n, w), n.id))
        chosen, rejected = _sides(good, bad, cfg)
        prefix = tree.render_path(node.id)
        for pos in chosen:
            for neg in rejected:
                qp, qn = q_value(pos, w), q_value(neg, w)
                if qp - qn <= 0 or qp - qn < cfg.min_margin:
                    continue
                if continuation_mean(tree, pos, flags, best=True) <= continuation_mean(tree, neg, flags, best=False):
                    continue
                pos_text, neg_text = render_node(pos), render_node(neg)
                if not _apart(pos_text, neg_text, cfg):
                    continue
                out.append(
                    PairRecord(info.problem_id, info.round, info.question, prefix, pos_text, neg_text,
                               qp, qn, qp - qn, "step", pos.depth, pos.id, neg.id, len(chosen), len(rejected))
                )
    return out


def final_pairs(tree: Tree, cfg: ExtractConfig) -> list[PairRecord]:
    good = sorted((trajectory(tree, n.id) for n in tree.terminals() if n.verdict == "correct"), key=_best_first)
    bad = sorted((trajectory(tree, n.id) for n in tree.terminals() if n.verdict == "wrong"), key=_worst_first)
    chosen, rejected = good[: cfg.pair_top_k], bad[: cfg.pair_top_k]
    info = tree.info
    out: list[PairRecord] = []
    for pos in chosen:
        for neg in rejected:
            if pos.q_mean - neg.q_mean <= 0 or pos.q_mean - neg.q_mean < cfg.min_margin:
                continue
            pos_text, neg_text = pos.text, neg.text
            if not _apart(pos_text, neg_text, cfg):
                continue
            out.append(
                PairRecord(info.problem_id, info.round, info.question, "", pos_text, neg_text, pos.q_mean,
                           neg.q_mean, pos.q_mean - neg.q_mean, "final", 0, pos.leaf_id, neg.leaf_id,
                           len(chosen), len(rejected))
            )
    return out


def step_labels(tree: Tree) -> list[StepsRecord]:
    info = tree.info
    w = info.prior_weight
    out: list[StepsRecord] = []
    for leaf in tree.nodes.values():
        if leaf.id == ROOT_ID or leaf.status == "open":
            continue
        nodes = tree.path(leaf.id)
        out.append(
            StepsRecord(
                info.problem_id, info.round, info.question, "",
                tuple(render_node(n) for n in nodes),
                tuple(max(-1.0, min(1.0, q_value(n, w))) for n in nodes),  # clamp float round-off only
                leaf.verdict if leaf.status == "terminal" else "dead",
                leaf.id,
            )
        )
    return out


def extract(tree: Tree, cfg: ExtractConfig) -> Extracted:
    """Everything one finished tree contributes to the round's datasets."""
    pairs = step_pairs(tree, cfg) + (final_pairs(tree, cfg) if cfg.final_pairs else [])
    return Extracted(sft_records(tree, cfg), pairs, step_labels(tree))


def export_row(record: SFTRecord | PairRecord | StepsRecord, prompt: str) -> dict:
    """The record as a row of its export (``data.schemas``): ``prefix`` replaced by the finished ``prompt``
    (the chat-templated question + prefix that the pipeline built), tuples as lists."""
    row = asdict(record)
    del row["prefix"]
    row = {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
    return {"prompt": prompt, **row}
