"""One problem's search tree: nodes by id, rejected candidates, and the bookkeeping that keeps every
search step O(depth + children), never a scan of the whole tree.

The tree knows structure (adding children, merging identical steps, closing exhausted subtrees) and how
to render a path; *when* to add, select or back up is ``mcts.search``'s business, and the values are
``mcts.qvalues``'. See ``mcts.node`` for the invariants.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mcts.node import NO_PARENT, ROOT_ID, Failure, FailureStage, Node, NodeStatus, SearchMode, Verdict
from mcts.steps import Step, render_step


@dataclass(frozen=True)
class TreeInfo:
    """What a tree is about; stored with every row of the node table."""

    problem_id: str
    question: str
    reference: str  # the reference answer as text, '' in test-time search
    round: int
    mode: SearchMode
    prior_weight: float
    seed: int  # tree_seed(run seed, round, problem id)


def step_key(text: str, final: bool) -> str:
    """Identity of a candidate under one parent: its text with trailing spaces dropped, and its finality
    (the same text stopped at <end_of_answer> and at <end_of_step> are different steps)."""
    body = "\n".join(line.rstrip() for line in text.strip("\n").splitlines())
    return ("F" if final else "S") + body


class Tree:
    def __init__(self, info: TreeInfo):
        self.info = info
        self.nodes: dict[int, Node] = {ROOT_ID: Node(id=ROOT_ID, parent=NO_PARENT, depth=0)}
        self.failures: list[Failure] = []
        self.next_id = ROOT_ID + 1
        self.rollouts = 0  # rollouts started so far
        self._by_key: dict[tuple[int, str], int] = {}  # (parent id, step_key) -> child id

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_ID]

    def new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    # ---- structure ---------------------------------------------------------------------------------

    def find_child(self, parent_id: int, key: str) -> int | None:
        return self._by_key.get((parent_id, key))

    def add_child(
        self,
        node_id: int,
        parent_id: int,
        step: Step,
        stdout: str,
        status: NodeStatus,
        verdict: Verdict = "",
    ) -> Node:
        """Attach a kept step under ``parent_id``. A terminal or dead child is created closed; an open child
        re-opens a parent that was closed only because all its children were (a multi-step proposal may
        pass through an exhausted node and continue below it)."""
        parent = self.nodes[parent_id]
        if parent.status != "open":
            raise ValueError(f"tree {self.info.problem_id}: node {parent_id} is {parent.status}; it cannot get a child")
        if node_id in self.nodes:
            raise ValueError(f"tree {self.info.problem_id}: node id {node_id} is already taken")
        node = Node(
            id=node_id,
            parent=parent_id,
            depth=parent.depth + 1,
            text=step.text,
            code=step.code,
            stdout=stdout,
            answer=step.answer,
            status=status,
            verdict=verdict,
        )
        if status == "open" and parent.closed:
            self._reopen(parent)
        self.insert(node)
        return node

    def insert(self, node: Node) -> None:
        """Link a fully built node under its parent (also used when loading a stored tree)."""
        self.nodes[node.id] = node
        parent = self.nodes[node.parent]
        parent.children.append(node.id)
        self._by_key.setdefault((node.parent, step_key(node.text, node.status == "terminal")), node.id)
        if node.status == "open":
            parent.open_children += 1
        else:
            node.closed = True

    def add_failure(self, parent_id: int, text: str, stage: FailureStage, error: str, failure_id: int | None = None) -> Failure:
        parent = self.nodes[parent_id]
        fid = self.new_id() if failure_id is None else failure_id
        failure = Failure(id=fid, parent=parent_id, depth=parent.depth + 1, text=text, stage=stage, error=error)
        self.failures.append(failure)
        return failure

    # ---- closing -----------------------------------------------------------------------------------

    def mark_expanded(self, node_id: int) -> None:
        """The node kept at least one child: selection now descends through it; it closes if all are closed."""
        node = self.nodes[node_id]
        node.expanded = True
        if node.open_children == 0 and not node.closed:
            self._close(node)

    def make_dead(self, node_id: int, reward: float) -> None:
        node = self.nodes[node_id]
        node.status = "dead"
        node.reward = reward
        if not node.closed:
            self._close(node)

    def _close(self, node: Node) -> None:
        # Walks up only while ancestors close too: O(depth) at worst, amortised O(1).
        node.closed = True
        pid = node.parent
        while pid != NO_PARENT:
            parent = self.nodes[pid]
            parent.open_children -= 1
            if parent.closed or not parent.expanded or parent.open_children > 0:
                return
            parent.closed = True
            pid = parent.parent

    def _reopen(self, node: Node) -> None:
        # Inverse of _close: the node gets an open child, so it and every ancestor closed on its account open.
        node.closed = False
        pid = node.parent
        while pid != NO_PARENT:
            parent = self.nodes[pid]
            parent.open_children += 1
            if not parent.closed:
                return
            parent.closed = False
            pid = parent.parent

    # ---- paths -------------------------------------------------------------------------------------

    def path(self, node_id: int) -> list[Node]:
        """Nodes from the first step down to ``node_id`` (the root excluded; [] for the root)."""
        out: list[Node] = []
        i = node_id
        while i != ROOT_ID:
            node = self.nodes[i]
            out.append(node)
            i = node.parent
        out.reverse()
        return out

    def render_path(self, node_id: int) -> str:
        """The rendered steps root -> ``node_id`` (``mcts.steps`` format), as the policy and the PPM see them."""
        return "".join(render_node(n) for n in self.path(node_id))

    def code_history(self, node_id: int) -> tuple[str, ...]:
        """The code of each step root -> ``node_id``: rebuilds that node's interpreter state on a miss."""
        return tuple(n.code for n in self.path(node_id))

    def terminals(self) -> Iterator[Node]:
        return (n for n in self.nodes.values() if n.status == "terminal")

    def __len__(self) -> int:
        return len(self.nodes)


def render_node(node: Node) -> str:
    """One step as shown in prompts and completions: text, '# output:' lines, delimiter."""
    return render_step(node.text, node.stdout, final=node.status == "terminal")
