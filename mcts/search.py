"""One tree's MCTS as a resumable state machine: ask ``next_request()``, answer it, ``feed()`` the answer.

A rollout (rStar-Math's, kept simple):

1. **Select** from the root: while the node is expanded, step to its open child with the best UCT
   (``mcts.uct``); stop at the first open node not yet expanded.
2. **Expand** it: the policy proposes k candidates (``ProposeRequest``); each is parsed into a chain of
   steps (``mcts.expand``); the chains execute level by level, each step in its parent's interpreter state,
   all of this tree's steps of one level in one ``ExecBatch``. A step identical to a sibling (same text
   and finality) is merged into it; a step whose code fails is recorded as a ``Failure`` and cuts its chain.
   Each kept final step is a terminal: graded at once (+1 / -1) and its reward backed up to the root.
   A kept non-final step at ``max_depth`` is a dead end: -1 recorded at that node only (rStar-Math;
   ``dead_end_backup="path"`` backs it up like a terminal). In PPM modes every new non-terminal node is then
   scored (``ScoreBatch``) and gets its prior; a graded terminal's Q stays exactly +1 / -1 (rStar-Math's
   rstar_deepthink/agents/mcts.py scores only non-terminal nodes; ``prior_on_closed`` scores all). In
   test-time mode a terminal is scored and its score is its reward.
   An expansion that keeps nothing counts against the node: ``max_consecutive_errors`` in a row make it
   a dead end (-1, as above); until then the rollout ends and later rollouts may retry it.
3. **Continue** down from the expanded node: through its open children by UCT (and along a multi-step
   chain) to an open node with no open child, and expand that one; the rollout ends when nothing open is
   left below (every new branch ended in a terminal or dead end, whose outcome is already backed up).

Each outcome is backed up once, when it happens; selection never re-enters a closed subtree, and the tree
is done when its rollout budget is spent or the root is closed.

**Parallel rollouts** (``SearchConfig.parallel_rollouts`` = L > 1; 1 is the search above, unchanged): up to L
rollouts of the tree are in flight at once, in lockstep. Each wave every rollout picks its next node (rollouts
already under way first, then new ones from the root), with a virtual loss (``mcts.uct``) on the paths picked
before it in the wave, so they spread over the tree; a rollout whose pick is already taken in this wave waits for
the next one. The picked nodes are expanded together: one ``ProposeRequest`` with a state per node, their chains
executed level by level in one ``ExecBatch``, their new nodes scored in one ``ScoreBatch``. Picked nodes are
unexpanded leaves, so no two of them lie on one path and the rollouts' new nodes never meet. A tree's generation
then no longer waits for each expansion in turn (what bounds a run's last trees), at the price of choices made
before the outcomes of the other rollouts of the wave are in. All randomness (UCT ties) comes from a
``random.Random`` seeded with the tree's seed, and each proposal carries a seed derived from (tree seed,
node, attempt), so a search is reproduced exactly however the trees of a worker are interleaved.

``mcts.wave`` drives many of these in lockstep (one policy batch per wave); a worker can also advance
each tree on its own (async) with the same two calls.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from mcts.config import SearchConfig
from mcts.expand import Chain, parse_proposal
from mcts.node import ROOT_ID, Node, NodeStatus, Verdict
from mcts.protocols import ExecOutcome, ExecRequest, Grader, ProblemLike, Proposal, SearchState
from mcts.qvalues import CORRECT_REWARD, DEAD_END_REWARD, WRONG_REWARD, backup, check_unit, record
from mcts.seeds import proposal_seed
from mcts.steps import Step
from mcts.tree import Tree, TreeInfo, step_key
from mcts.uct import select_child


@dataclass(frozen=True)
class ProposeRequest:
    """Ask the policy for ``k`` continuations of each state (one per rollout in flight; normally one); feed back
    one ``list[Proposal]`` per state, in order (what ``Policy.propose(states, k)`` returns)."""

    states: tuple[SearchState, ...]
    k: int


@dataclass(frozen=True)
class ExecBatch:
    """Run these steps; feed back the executor's outcomes, in order."""

    requests: tuple[ExecRequest, ...]


@dataclass(frozen=True)
class ScoreBatch:
    """Score these prefixes with the PPM; feed back ``list[float]`` in [-1, 1], in order."""

    states: tuple[SearchState, ...]
    node_ids: tuple[int, ...]


Request = ProposeRequest | ExecBatch | ScoreBatch


@dataclass
class SearchStats:
    expansions: int = 0
    failed_expansions: int = 0  # expansions that kept no candidate
    proposals: int = 0
    executed: int = 0  # steps sent to the executor
    merged: int = 0  # candidate steps merged into an identical sibling
    terminals: int = 0
    dead_ends: int = 0


@dataclass
class _LiveChain:
    """A chain being attached: ``steps[pos]`` goes under node ``parent`` next."""

    chain: Chain
    parent: int
    lane: int  # the rollout (``_Lane``) whose expansion proposed it
    pos: int = 0
    cut: bool = False  # a step failed to execute: the chain ends there (its own rejection no longer applies)


@dataclass
class _Pending:
    """One step sent to the executor; the chains that continue through it if it is kept."""

    node_id: int
    parent: int
    step: Step
    final: bool
    lane: int
    chains: list[_LiveChain] = field(default_factory=list)


@dataclass
class _Lane:
    """One rollout slot: ``SearchConfig.parallel_rollouts`` of them, used in order (one unless parallel)."""

    leaf: int = ROOT_ID  # the node this lane's rollout expands (or expanded last)
    active: bool = False  # a rollout is under way in this lane
    new: list[int] = field(default_factory=list)  # nodes its current expansion created (scored in PPM modes)


class TreeSearch:
    """MCTS over one problem (``mcts.protocols.ProblemLike``)."""

    def __init__(
        self,
        problem: ProblemLike,
        config: SearchConfig,
        seed: int,
        grader: Grader | None = None,
        round_index: int = 0,
    ):
        if config.mode != "test_time" and grader is None:
            raise ValueError(f"search.mode={config.mode!r} grades terminals: pass a grader (e.g. data.grade)")
        reference = problem.answer
        self.problem = problem
        self.config = config
        self.grader = grader
        self.tree = Tree(
            TreeInfo(
                problem_id=problem.id,
                question=problem.question,
                reference="" if reference is None else str(reference),
                round=round_index,
                mode=config.mode,
                prior_weight=config.prior_weight,
                seed=seed,
            )
        )
        self.stats = SearchStats()
        self._rng = random.Random(seed)
        self._budget = config.rollouts
        self._lanes = [_Lane() for _ in range(config.parallel_rollouts)]
        self._expanding: list[int] = []  # lanes whose leaves the current wave expands, in request order
        self._request: Request | None = None
        self._live: list[_LiveChain] = []
        self._pending: list[_Pending] = []
        self._next_wave()

    # ---- the protocol --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._request is None

    @property
    def tree_id(self) -> str:
        return self.tree.info.problem_id

    def next_request(self) -> Request | None:
        """What this tree needs next (the same object until it is fed); None once the search is done."""
        return self._request

    def feed(self, result: Sequence[object]) -> None:
        """Answer the current request: proposals, executor outcomes or PPM scores, in request order."""
        req = self._request
        if req is None:
            raise RuntimeError(f"tree {self.tree_id}: search is done; nothing to feed")
        # What ``result`` holds is fixed by the request it answers (the module doc's protocol): say so to the checker.
        if isinstance(req, ProposeRequest):
            self._on_proposals(cast("Sequence[Sequence[Proposal]]", result))
        elif isinstance(req, ExecBatch):
            if len(result) != len(req.requests):
                raise ValueError(f"tree {self.tree_id}: {len(result)} outcomes for {len(req.requests)} exec requests")
            self._on_outcomes(cast("Sequence[ExecOutcome]", result))
        else:
            if len(result) != len(req.states):
                raise ValueError(f"tree {self.tree_id}: {len(result)} scores for {len(req.states)} states")
            self._on_scores(req, cast("Sequence[float]", result))

    def extend(self, rollouts: int) -> None:
        """Grant more rollouts (e.g. round 4's extra rollouts for unsolved problems); resumes a done search."""
        if rollouts < 0:
            raise ValueError(f"extend(rollouts={rollouts}): must be >= 0")
        self._budget += rollouts
        if self._request is None:
            self._next_wave()

    # ---- rollouts ------------------------------------------------------------------------------------

    def _next_wave(self) -> None:
        """Pick the nodes to expand next, one per lane that can go on, and ask for their proposals.

        A lane whose rollout is under way continues it: after a kept expansion, down from its leaf through open
        children to the next node to expand; a rollout whose leaf closed (or whose expansion kept nothing) has
        ended. A free lane starts a rollout, if the budget allows, from the root down through expanded nodes.
        Lanes under way pick first, so a new rollout never takes the node a running one continues to.
        """
        tree = self.tree
        taken: set[int] = set()
        virtual: dict[int, int] = {}
        self._expanding = []
        for lane in self._lanes:
            if lane.active and tree.nodes[lane.leaf].closed:
                lane.active = False  # nothing open is left below it: this rollout has ended
        for i in sorted(range(len(self._lanes)), key=lambda i: not self._lanes[i].active):
            lane = self._lanes[i]
            if lane.active:
                node = tree.nodes[lane.leaf]
                while node.open_children > 0:
                    node = tree.nodes[self._select(node, virtual)]
            elif tree.rollouts < self._budget and not tree.root.closed:
                node = tree.root
                while node.expanded:  # an expanded open node always has an open child
                    node = tree.nodes[self._select(node, virtual)]
            else:
                continue
            if node.id in taken:
                continue  # a lane before it expands that node in this wave: this one waits for the next wave
            if not lane.active:  # a new rollout starts
                tree.rollouts += 1
                lane.active = True
            lane.leaf = node.id
            taken.add(node.id)
            self._expanding.append(i)
            if len(self._lanes) > 1:
                for n in tree.path(node.id):
                    virtual[n.id] = virtual.get(n.id, 0) + 1
        if not self._expanding:
            self._request = None
            return
        self._request = ProposeRequest(tuple(self._state(self._lanes[i].leaf) for i in self._expanding),
                                       self.config.children)

    def _select(self, node: Node, virtual: dict[int, int]) -> int:
        cid = select_child(
            self.tree.nodes, node, self.config.c_puct, self.config.unvisited, self.config.prior_weight, self._rng,
            virtual,
        )
        if cid is None:
            raise AssertionError(f"tree {self.tree_id}: open node {node.id} has no open child")
        return cid

    def _state(self, node_id: int) -> SearchState:
        node = self.tree.nodes[node_id]
        return SearchState(
            tree_id=self.tree_id,
            question=self.tree.info.question,
            history=self.tree.render_path(node_id),
            seed=proposal_seed(self.tree.info.seed, node_id, node.errors),
        )

    # ---- expansion -------------------------------------------------------------------------------------

    def _on_proposals(self, per_state: Sequence[Sequence[Proposal]]) -> None:
        if len(per_state) != len(self._expanding) or any(isinstance(p, (Proposal, str)) for p in per_state):
            raise TypeError(f"tree {self.tree_id}: fed {per_state!r} for {len(self._expanding)} proposal state(s); "
                            "expected one list of mcts.protocols.Proposal per state")
        bad = next((p for proposals in per_state for p in proposals if not isinstance(p, Proposal)), None)
        if bad is not None:  # checked before anything changes: the search can still be fed the right answer
            raise TypeError(f"tree {self.tree_id}: the policy returned {bad!r}; expected mcts.protocols.Proposal")
        self._live = []
        for i, proposals in zip(self._expanding, per_state, strict=True):
            lane = self._lanes[i]
            self.stats.expansions += 1
            self.stats.proposals += len(proposals)
            room = self.config.max_depth - self.tree.nodes[lane.leaf].depth
            lane.new = []
            self._live += [_LiveChain(parse_proposal(p, room, self.config.require_code), lane.leaf, i)
                           for p in proposals]
        self._next_level()

    def _next_level(self) -> None:
        """Attach every live chain's next step: merge into existing siblings, batch the rest for execution."""
        tree = self.tree
        pending: dict[tuple[int, str], _Pending] = {}
        still: list[_LiveChain] = []
        for live in self._live:
            while not live.cut:
                steps = live.chain.steps
                if live.pos == len(steps):
                    self._finish_chain(live)
                    break
                if tree.nodes[live.parent].status != "open":
                    break  # unreachable: chains end at a final step and at max_depth, as terminals / dead ends do
                final = live.chain.final and live.pos == len(steps) - 1
                key = step_key(steps[live.pos].text, final)
                existing = tree.find_child(live.parent, key)
                if existing is not None:
                    self.stats.merged += 1
                    live.parent, live.pos = existing, live.pos + 1
                    continue
                slot = (live.parent, key)
                if slot in pending:
                    self.stats.merged += 1
                else:
                    pending[slot] = _Pending(tree.new_id(), live.parent, steps[live.pos], final, live.lane)
                pending[slot].chains.append(live)
                still.append(live)
                break
        self._live = still
        self._pending = list(pending.values())
        if not self._pending:
            self._end_expansion()
            return
        requests = tuple(
            ExecRequest(
                tree_id=self.tree_id,
                node_key=str(p.node_id),
                parent_key=None if p.parent == ROOT_ID else str(p.parent),
                history=tree.code_history(p.parent),
                code=p.step.code,
            )
            for p in self._pending
        )
        self.stats.executed += len(requests)
        self._request = ExecBatch(requests)

    def _finish_chain(self, live: _LiveChain) -> None:
        rejected = live.chain.rejected
        if rejected is not None:
            self.tree.add_failure(live.parent, rejected.text, rejected.stage, rejected.error)

    def _on_outcomes(self, outcomes: Sequence[ExecOutcome]) -> None:
        tree = self.tree
        for p, out in zip(self._pending, outcomes, strict=True):
            if not out.ok:
                dropped = sum(len(c.chain.steps) - c.pos - 1 for c in p.chains)
                error = out.error or "execution failed (no error message)"
                if dropped:
                    error += f" (chain cut: {dropped} later step(s) dropped)"
                tree.add_failure(p.parent, p.step.text, "exec", error, failure_id=p.node_id)
                for live in p.chains:
                    live.cut = True
                continue
            self._keep(p, out.stdout)
            for live in p.chains:
                live.parent, live.pos = p.node_id, live.pos + 1
        self._pending = []
        self._next_level()

    def _keep(self, p: _Pending, stdout: str) -> None:
        tree = self.tree
        depth = tree.nodes[p.parent].depth + 1
        status: NodeStatus = "open"
        verdict: Verdict = ""
        if p.final:
            status, verdict = "terminal", self._grade(p.step.answer)
        elif depth >= self.config.max_depth:
            status = "dead"
        node = tree.add_child(p.node_id, p.parent, p.step, stdout, status, verdict)
        self._lanes[p.lane].new.append(node.id)
        if status == "terminal":
            self.stats.terminals += 1
            if verdict != "ungraded":  # test-time terminals are backed up once the PPM scored them
                node.reward = CORRECT_REWARD if verdict == "correct" else WRONG_REWARD
                backup(tree.nodes, node.id, node.reward)
        elif status == "dead":
            self.stats.dead_ends += 1
            node.reward = DEAD_END_REWARD
            self._dead_end(node.id)

    def _grade(self, answer: str | None) -> Verdict:
        if self.config.mode == "test_time":
            return "ungraded"
        if answer is None:
            return "wrong"  # stopped at <end_of_answer> without a \boxed{} answer
        assert self.grader is not None
        try:
            ok = self.grader(self.problem, answer)
        except Exception as e:
            raise RuntimeError(f"tree {self.tree_id}: grader failed on answer {answer!r}: {type(e).__name__}: {e}") from e
        return "correct" if ok else "wrong"

    def _end_expansion(self) -> None:
        tree = self.tree
        scored: list[int] = []
        for i in self._expanding:
            lane = self._lanes[i]
            leaf = tree.nodes[lane.leaf]
            if not leaf.children:
                self.stats.failed_expansions += 1
                leaf.errors += 1
                if leaf.errors >= self.config.max_consecutive_errors:
                    self.stats.dead_ends += 1
                    tree.make_dead(leaf.id, DEAD_END_REWARD)
                    self._dead_end(leaf.id)
                lane.active = False  # the rollout ends; a later one may retry the node
            else:
                leaf.errors = 0
                tree.mark_expanded(leaf.id)
                if self.config.uses_scorer:
                    scored += [n for n in lane.new if self._gets_prior(tree.nodes[n])]
            lane.new = []
        if scored:
            states = tuple(
                SearchState(self.tree_id, tree.info.question, tree.render_path(i), tree.info.seed) for i in scored
            )
            self._request = ScoreBatch(states, tuple(scored))
            return
        self._next_wave()

    def _gets_prior(self, node: Node) -> bool:
        """Which new nodes the PPM scores: open ones, and test-time terminals (their score is their reward).
        A graded terminal keeps Q = +1 / -1 and a dead end -1 unless ``prior_on_closed``."""
        return node.status == "open" or node.verdict == "ungraded" or self.config.prior_on_closed

    def _dead_end(self, node_id: int) -> None:
        """Record a dead end's -1: at the node only (rStar-Math, rstar_deepthink/agents/mcts.py ``node.update``)
        or along the path to the root (``dead_end_backup="path"``)."""
        if self.config.dead_end_backup == "node":
            record(self.tree.nodes[node_id], DEAD_END_REWARD)
        else:
            backup(self.tree.nodes, node_id, DEAD_END_REWARD)

    def _on_scores(self, req: ScoreBatch, scores: Sequence[float]) -> None:
        tree = self.tree
        for node_id, score in zip(req.node_ids, scores, strict=True):
            node = tree.nodes[node_id]
            node.prior = check_unit(score, f"tree {self.tree_id} node {node_id} PPM score")
            if node.verdict == "ungraded":
                node.reward = node.prior
                backup(tree.nodes, node_id, node.reward)
        self._next_wave()


def solved(search: TreeSearch) -> bool:
    """Whether some terminal of the search's tree was graded correct."""
    return any(n.verdict == "correct" for n in search.tree.terminals())


def escalate(search: TreeSearch, rollouts: int, seed: int) -> TreeSearch:
    """The next escalation stage of a finished, unsolved search (round 4; ``RoundSpec.unsolved_rollouts``).

    A tree with open nodes left is extended in place to ``rollouts`` in all (nothing searched is thrown away).
    An exhausted tree (root closed: more rollouts would do nothing) is replaced by a fresh ``TreeSearch`` of the
    same problem with ``rollouts`` and the new ``seed`` (rStar-Math re-searches unsolved problems with 64,
    then 128 rollouts and new random seeds; paper arXiv 2501.04519, round 4). The caller releases the old
    tree's executor states before running a fresh one: both have the same tree id.
    """
    if not search.done or solved(search):
        raise ValueError(f"tree {search.tree_id}: escalate only a finished, unsolved search")
    if not search.tree.root.closed:
        search.extend(max(0, rollouts - search.tree.rollouts))
        return search
    cfg = dataclasses.replace(search.config, rollouts=rollouts)
    return TreeSearch(search.problem, cfg, seed, search.grader, round_index=search.tree.info.round)
