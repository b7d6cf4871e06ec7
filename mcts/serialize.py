"""A tree as rows of the node table (``data.schemas.TREES_SCHEMA``) and back, losslessly.

One row per kept node (``record='node'``, in id order, root first) and one per rejected candidate
(``record='failed'``, in the order they were recorded). Every row repeats the tree's ``TreeInfo``.
Reading back rebuilds the derived bookkeeping (children lists, open-child counts, closed flags, the merge
index) from the stored fields, so ``tree_from_rows(tree_to_rows(t))`` equals ``t`` field for field.
Rows are plain dicts; ``trees_to_table`` / ``table_to_trees`` convert many trees to and from Arrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mcts.node import NO_PARENT, ROOT_ID, Failure, Node
from mcts.qvalues import q_value
from mcts.tree import Tree, TreeInfo

Row = dict[str, Any]


def _info_columns(info: TreeInfo, rollouts: int) -> Row:
    return {
        "problem_id": info.problem_id,
        "round": info.round,
        "mode": info.mode,
        "prior_weight": info.prior_weight,
        "tree_seed": info.seed,
        "question": info.question,
        "reference": info.reference,
        "rollouts": rollouts,
    }


def tree_to_rows(tree: Tree) -> list[Row]:
    base = _info_columns(tree.info, tree.rollouts)
    rows: list[Row] = []
    for i in sorted(tree.nodes):
        n = tree.nodes[i]
        rows.append({
            **base, "record": "node", "id": n.id, "parent": n.parent, "depth": n.depth, "text": n.text,
            "code": n.code, "stdout": n.stdout, "answer": n.answer, "status": n.status, "verdict": n.verdict,
            "reward": n.reward, "visits": n.visits, "value_sum": n.value_sum, "prior": n.prior,
            "q": q_value(n, tree.info.prior_weight), "expanded": n.expanded, "errors": n.errors,
            "stage": "", "error": "",
        })
    for f in tree.failures:
        rows.append({
            **base, "record": "failed", "id": f.id, "parent": f.parent, "depth": f.depth, "text": f.text,
            "code": "", "stdout": "", "answer": None, "status": "", "verdict": "", "reward": 0.0, "visits": 0,
            "value_sum": 0.0, "prior": None, "q": 0.0, "expanded": False, "errors": 0,
            "stage": f.stage, "error": f.error,
        })
    return rows


def tree_from_rows(rows: Sequence[Row]) -> Tree:
    """Rebuild one tree from its rows (any order). Raises ValueError naming the problem on broken input."""
    if not rows:
        raise ValueError("tree_from_rows: no rows")
    first = rows[0]
    pid = first["problem_id"]
    info = TreeInfo(
        problem_id=pid,
        question=first["question"],
        reference=first["reference"],
        round=int(first["round"]),
        mode=first["mode"],
        prior_weight=float(first["prior_weight"]),
        seed=int(first["tree_seed"]),
    )
    tree = Tree(info)
    tree.rollouts = int(first["rollouts"])
    node_rows = sorted((r for r in rows if r["record"] == "node"), key=lambda r: r["id"])
    fail_rows = [r for r in rows if r["record"] == "failed"]
    if any(r["problem_id"] != pid or r["round"] != info.round for r in rows):
        raise ValueError(f"tree_from_rows: rows of problem {pid!r} are mixed with another tree's")
    if not node_rows or node_rows[0]["id"] != ROOT_ID or node_rows[0]["parent"] != NO_PARENT:
        raise ValueError(f"tree {pid!r}: the rows hold no root (node {ROOT_ID} with parent {NO_PARENT})")
    for r in node_rows:
        node = Node(
            id=r["id"], parent=r["parent"], depth=r["depth"], text=r["text"], code=r["code"], stdout=r["stdout"],
            answer=r["answer"], status=r["status"], verdict=r["verdict"], reward=float(r["reward"]),
            visits=r["visits"], value_sum=float(r["value_sum"]),
            prior=None if r["prior"] is None else float(r["prior"]), expanded=r["expanded"], errors=r["errors"],
        )
        if node.id == ROOT_ID:
            tree.nodes[ROOT_ID] = node
            node.closed = node.status != "open"
            continue
        if node.parent not in tree.nodes:
            raise ValueError(f"tree {pid!r}: node {node.id} has parent {node.parent}, which is not an earlier node")
        tree.insert(node)
    # Expanded nodes whose children are all closed are closed too; children have larger ids, so one
    # pass in decreasing id order settles each node before its parent.
    for i in sorted(tree.nodes, reverse=True):
        node = tree.nodes[i]
        if node.expanded and not node.closed and node.open_children == 0:
            node.closed = True
            if node.parent != NO_PARENT:
                tree.nodes[node.parent].open_children -= 1
    for r in fail_rows:
        tree.failures.append(Failure(id=r["id"], parent=r["parent"], depth=r["depth"], text=r["text"],
                                     stage=r["stage"], error=r["error"]))
    tree.next_id = max([r["id"] for r in rows]) + 1
    return tree


def trees_to_table(trees: Iterable[Tree]) -> Any:
    """All rows of ``trees`` as one ``pyarrow.Table`` with ``TREES_SCHEMA``."""
    import pyarrow as pa

    from data.schemas import TREES_SCHEMA

    return pa.Table.from_pylist([row for t in trees for row in tree_to_rows(t)], schema=TREES_SCHEMA)


def table_to_trees(table: Any) -> list[Tree]:
    """The trees stored in a node table (e.g. ``pq.read_table(shard)``), in order of first appearance."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in table.to_pylist():
        groups.setdefault((row["problem_id"], row["round"]), []).append(row)
    return [tree_from_rows(rows) for rows in groups.values()]
