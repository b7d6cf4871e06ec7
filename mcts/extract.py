"""Training data out of a finished tree: SFT trajectories, PPM preference pairs, step labels.

Records keep the question and the rendered step prefix apart (``question``, ``prefix``): the pipeline's
export turns them into one chat-templated ``prompt`` with the model's prompt builder, so training and
inference see identical text. Steps are rendered exactly as the policy sees them (``mcts.steps``).

Definitions (Q from ``mcts.qvalues.q_value``; a trajectory is the path root -> a terminal):
- a trajectory's score is the mean Q of its steps, ties broken by the min step Q (then by node id);
- a node *leads to a correct answer* when its subtree holds a correct terminal, and *to a wrong one* when
  it holds a wrong terminal and no correct one (the two never overlap);
- SFT: the ``sft_top_n`` best correct trajectories;
- step pairs: at every node with children of both kinds, the ``pair_top_k`` highest-Q correct-leading
  children (chosen) against the ``pair_top_k`` lowest-Q wrong-leading ones (rejected), every combination
  whose Q margin is >= ``min_margin``; the prompt is the question plus the shared prefix;
- final pairs (rStar-Math's relaxation at the last step, where siblings rarely share a prefix): the
  ``pair_top_k`` best correct trajectories against the ``pair_top_k`` worst wrong ones by mean Q, as whole
  solutions after the bare question (prefix '', depth 0), with the same margin rule;
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
    return {i: (correct[i], wrong[i] and not correct[i]) for i in tree.nodes}


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
        prefix = tree.render_path(node.id)
        for pos in good[: cfg.pair_top_k]:
            for neg in bad[: cfg.pair_top_k]:
                qp, qn = q_value(pos, w), q_value(neg, w)
                if qp - qn < cfg.min_margin:
                    continue
                out.append(
                    PairRecord(info.problem_id, info.round, info.question, prefix, render_node(pos), render_node(neg),
                               qp, qn, qp - qn, "step", pos.depth, pos.id, neg.id)
                )
    return out


def final_pairs(tree: Tree, cfg: ExtractConfig) -> list[PairRecord]:
    good = sorted((trajectory(tree, n.id) for n in tree.terminals() if n.verdict == "correct"), key=_best_first)
    bad = sorted((trajectory(tree, n.id) for n in tree.terminals() if n.verdict == "wrong"), key=_worst_first)
    info = tree.info
    out: list[PairRecord] = []
    for pos in good[: cfg.pair_top_k]:
        for neg in bad[: cfg.pair_top_k]:
            if pos.q_mean - neg.q_mean < cfg.min_margin:
                continue
            out.append(
                PairRecord(info.problem_id, info.round, info.question, "", pos.text, neg.text, pos.q_mean,
                           neg.q_mean, pos.q_mean - neg.q_mean, "final", 0, pos.leaf_id, neg.leaf_id)
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
