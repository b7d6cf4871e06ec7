"""Scripted-fake searches whose every visit count and value is computed by hand in the comments."""

import dataclasses
import threading

import pytest
from mcts_fakes import (
    InstantExecutor,
    Locked,
    NamespaceExecutor,
    Problem,
    ScriptedPolicy,
    TableScorer,
    TableScript,
    exact_grader,
    final,
    last_step,
    random_script,
    step,
)

from mcts.config import SearchConfig
from mcts.protocols import Proposal
from mcts.search import ExecBatch, ProposeRequest, ScoreBatch, TreeSearch
from mcts.serialize import tree_to_rows
from mcts.wave import run_lanes, run_one, run_search

P = Problem("p1", "What is 2 * 2?", "4")
A2 = "# a is 2\na = 2\nprint(a)"
A3 = "# a is 3\na = 3"
DOUBLE = "# double it\nprint(a * 2)"


def _nv(tree):
    """node id -> (N, W)"""
    return {i: (n.visits, n.value_sum) for i, n in tree.nodes.items()}


def test_terminal_rewards_are_backed_up_once_each_until_the_tree_is_exhausted():
    script = TableScript({
        "": [step(A2), step(A3), step("# oops\nundefined_name + 1")],
        A2: [step(DOUBLE), final("# The answer is \\boxed{5}")],
        DOUBLE: [final("# The answer is \\boxed{4}")],
        A3: [final("# The answer is \\boxed{6}")],
    })
    s = TreeSearch(P, SearchConfig(rollouts=10, children=3), seed=1, grader=exact_grader)
    run_one(s, ScriptedPolicy(script), NamespaceExecutor())
    t = s.tree
    # ids: 1 = A2, 2 = A3, 3 = the failing candidate; then A2's children 4 = DOUBLE, 5 = \boxed{5};
    # 6 = \boxed{4} under DOUBLE and 7 = \boxed{6} under A3 (or 6/7 swapped: the rollout order is a UCT tie).
    assert [(f.id, f.stage, f.error) for f in t.failures] == [(3, "exec", "NameError: name 'undefined_name' is not defined")]
    by_answer = {n.answer: n for n in t.terminals()}
    assert {a: n.verdict for a, n in by_answer.items()} == {"4": "correct", "5": "wrong", "6": "wrong"}
    # Outcomes: +1 (answer 4), -1 (answer 5), -1 (answer 6), each once.
    # root: N = 3, W = 1 - 1 - 1 = -1;  A2: N = 2, W = 1 - 1 = 0;  A3: N = 1, W = -1;  DOUBLE: N = 1, W = 1
    assert (t.root.visits, t.root.value_sum) == (3, -1.0)
    assert (t.nodes[1].visits, t.nodes[1].value_sum) == (2, 0.0)
    assert (t.nodes[2].visits, t.nodes[2].value_sum) == (1, -1.0)
    assert (t.nodes[4].visits, t.nodes[4].value_sum) == (1, 1.0)
    # Every branch ended, so the root closed after 2 rollouts although 10 were allowed:
    # rollout 1 expands root, then one of A2 / A3 (and DOUBLE below A2); rollout 2 the other.
    assert t.root.closed and s.done and t.rollouts == 2
    assert s.stats.expansions == 4 and s.stats.terminals == 3
    assert t.nodes[1].stdout == "2\n" and by_answer["4"].parent == 4


def test_a_node_whose_expansions_keep_nothing_twice_is_a_dead_end():
    policy = ScriptedPolicy(lambda st: [step("# fail\n1 / 0")])
    s = TreeSearch(P, SearchConfig(rollouts=5, children=1, max_consecutive_errors=2), seed=3, grader=exact_grader)
    run_one(s, policy, NamespaceExecutor())
    t = s.tree
    # rollout 1: the root's only candidate fails -> errors = 1, nothing backed up;
    # rollout 2: fails again -> errors = 2 = max -> dead end, -1 recorded at the root itself: N = 1, W = -1.
    assert (t.root.status, t.root.errors, t.root.visits, t.root.value_sum) == ("dead", 2, 1, -1.0)
    assert t.rollouts == 2 and s.done and len(policy.batches) == 2
    assert [f.error for f in t.failures] == ["ZeroDivisionError: division by zero"] * 2
    # each retry samples with a fresh seed (derived from the attempt number)
    assert policy.batches[0][0].seed != policy.batches[1][0].seed


def test_a_non_final_step_at_max_depth_is_a_dead_end_updating_only_itself():
    policy = ScriptedPolicy(lambda st: [step(f"# next\nx = {len(st.history)}")])
    s = TreeSearch(P, SearchConfig(rollouts=3, children=1, max_depth=2), seed=0, grader=exact_grader)
    run_one(s, policy, InstantExecutor())
    t = s.tree
    # one rollout: root -> node 1 (depth 1) -> node 2 (depth 2 = max, not final) = dead end. rStar-Math records
    # its -1 at node 2 only: node 2: N=1, W=-1; node 1 and root: N=0, W=0. Everything closed: the search stops.
    assert _nv(t) == {0: (0, 0.0), 1: (0, 0.0), 2: (1, -1.0)}
    assert t.nodes[2].status == "dead" and t.root.closed and t.rollouts == 1
    # dead_end_backup="path" (the project's earlier rule): -1 on every node of the path.
    s = TreeSearch(P, SearchConfig(rollouts=3, children=1, max_depth=2, dead_end_backup="path"), seed=0,
                   grader=exact_grader)
    run_one(s, policy, InstantExecutor())
    assert _nv(s.tree) == {0: (1, -1.0), 1: (1, -1.0), 2: (1, -1.0)}


def test_root_w_is_the_sum_of_the_terminals_w_when_dead_ends_update_only_themselves():
    script = TableScript({
        "": [step(A2), step(A3)],
        A2: [step(DOUBLE), final("# The answer is \\boxed{5}")],
        DOUBLE: [step("# again\nb = a"), final("# The answer is \\boxed{4}")],  # "again" is at max depth 3
        A3: [step("# fail\n1 / 0")],  # A3's expansions keep nothing twice: a dead end
    })
    s = TreeSearch(P, SearchConfig(rollouts=10, children=2, max_depth=3), seed=1, grader=exact_grader)
    run_one(s, ScriptedPolicy(script), NamespaceExecutor())
    t = s.tree
    dead = [n for n in t.nodes.values() if n.status == "dead"]
    assert sorted(n.text for n in dead) == ["# a is 3\na = 3", "# again\nb = a"]
    assert all((n.visits, n.value_sum) == (1, -1.0) for n in dead)
    # terminals: \boxed{5} wrong (W = -1) and \boxed{4} correct (W = +1): root W = -1 + 1 = 0, N = 2;
    # the two dead ends (-1 each) are not in it.
    terminals = list(t.terminals())
    assert sorted(n.value_sum for n in terminals) == [-1.0, 1.0]
    assert (t.root.visits, t.root.value_sum) == (2, sum(n.value_sum for n in terminals))
    # and at every node: W = the sum of the W of the terminals below it (plus its own -1 if it is dead)
    for n in t.nodes.values():
        below = [x for x in terminals if n.id in {p.id for p in t.path(x.id)} or n.id == 0]
        assert n.value_sum == sum(x.value_sum for x in below) + (n.reward if n.status == "dead" else 0.0), n.id


def test_solution_chains_execute_level_by_level_and_merge_identical_steps():
    s1 = "# x is 1\nx = 1"
    p1 = Proposal(s1 + "\n# add one\ny = x + 1\n# The answer is \\boxed{2}", None)
    p2 = Proposal(s1 + "\n# add five\ny = x + 5\nprint(y)\n# The answer is \\boxed{6}", None)
    policy = ScriptedPolicy(lambda st: [p1, p2] if st.history == "" else [])
    ex = NamespaceExecutor()
    s = TreeSearch(Problem("c", "?", "2"), SearchConfig(rollouts=1, children=2), seed=0, grader=exact_grader)
    run_one(s, policy, ex)
    t = s.tree
    # The shared first step is executed once (merged), then the two second steps, then the two answers.
    assert [len(b) for b in ex.batches] == [1, 2, 2] and s.stats.merged == 1
    assert [r.parent_key for r in ex.batches[1]] == ["1", "1"] and ex.batches[0][0].parent_key is None
    assert ex.batches[2][0].history == ("x = 1", "y = x + 1")
    assert t.nodes[1].children == [2, 3] and t.nodes[3].stdout == "6\n"
    # +1 from node 4 (answer 2) and -1 from node 5 (answer 6):
    # root N=2 W=0, node 1 N=2 W=0, node 2 N=1 W=1, node 3 N=1 W=-1
    assert _nv(t) == {0: (2, 0.0), 1: (2, 0.0), 2: (1, 1.0), 3: (1, -1.0), 4: (1, 1.0), 5: (1, -1.0)}
    # The rollout then continues down the chain: at node 1 (N=2, ln 2 = 0.6931):
    #   UCT(2) = 1 + 2*sqrt(0.6931/1) = 2.665,  UCT(3) = -1 + 1.665 = 0.665  -> node 2,
    # whose only child is closed, so node 2 is expanded next. The policy returns nothing new, but node 2
    # already has a child from the chain: it counts as expanded (no error) and, that child being closed, closes.
    assert policy.batches[1][0].history == t.render_path(2)
    assert (t.nodes[2].errors, t.nodes[2].expanded, t.nodes[2].closed) == (0, True, True)
    assert not t.nodes[1].expanded and not t.nodes[1].closed  # node 3 below it is still open
    assert t.root.expanded and s.done  # 1 rollout allowed


def test_a_proposal_cut_by_the_token_limit_keeps_its_good_steps_as_non_terminal():
    cut = Proposal("# x is 1\nx = 1\n# then\ny = x +", None)  # the second step's code is cut mid-line
    policy = ScriptedPolicy(lambda st: [cut] if st.history == "" else [])
    s = TreeSearch(P, SearchConfig(rollouts=1, children=1), seed=0, grader=exact_grader)
    run_one(s, policy, NamespaceExecutor())
    t = s.tree
    assert t.nodes[1].status == "open" and t.nodes[1].text == "# x is 1\nx = 1"
    assert [(f.parent, f.stage) for f in t.failures] == [(1, "exec")] and "SyntaxError" in t.failures[0].error


def test_ppm_mode_initialises_q_of_non_terminal_nodes_only():
    script = TableScript({"": [step("# a\na = 1"), step("# b\nb = 1")], "# a\na = 1": [final("# \\boxed{4}")]})
    scorer = TableScorer({"# a\na = 1": 0.6, "# b\nb = 1": -0.2, "# \\boxed{4}": -0.9})
    cfg = SearchConfig(mode="ppm", rollouts=1, children=2)
    s = TreeSearch(P, cfg, seed=0, grader=exact_grader)
    run_one(s, ScriptedPolicy(script), InstantExecutor(), scorer)
    t = s.tree
    a, b, ans = t.nodes[1], t.nodes[2], t.nodes[3]
    # rStar-Math: the PPM scores the two open steps; the graded final step is never sent to it.
    assert (a.prior, b.prior, ans.prior) == (0.6, -0.2, None) and [len(x) for x in scorer.batches] == [2]
    # After the root's expansion the root has no visits (ln term 0), so UCT = Q = prior: a (0.6) over b (-0.2).
    # a's child is correct: +1 backed up. Q(a) = (W + w*p) / (N + w) = (1 + 0.6) / (1 + 1) = 0.8
    from mcts.qvalues import q_value

    assert ans.verdict == "correct" and q_value(a, 1.0) == pytest.approx(0.8)
    assert q_value(ans, 1.0) == 1.0  # exactly +1: W / N = 1 / 1, no PPM score mixed in
    assert q_value(b, 1.0) == pytest.approx(-0.2)  # never visited: its prior
    assert q_value(a, 3.0) == pytest.approx(0.7)  # with w = 3: (1 + 3*0.6) / (1 + 3) = 2.8 / 4
    # prior_on_closed=True (the project's earlier rule) mixes the terminal's score -0.9 into its Q:
    # (1 + 1*(-0.9)) / (1 + 1) = 0.05
    s = TreeSearch(P, dataclasses.replace(cfg, prior_on_closed=True), seed=0, grader=exact_grader)
    run_one(s, ScriptedPolicy(script), InstantExecutor(), scorer)
    assert q_value(s.tree.nodes[3], 1.0) == pytest.approx(0.05)


def test_test_time_mode_backs_up_the_terminal_ppm_score_and_picks_the_best_answer():
    from mcts.answers import best_answer, terminal_answers, vote

    seven, eight, eight_b = "# so \\boxed{7}", "# so \\boxed{8}", "# hence \\boxed{8}"
    policy = ScriptedPolicy(lambda st: [final(seven), final(eight), final(eight_b)])
    scorer = TableScorer({seven: 0.9, eight: -0.3, eight_b: 0.1})
    s = TreeSearch(Problem("t", "?", ""), SearchConfig(mode="test_time", rollouts=4, children=3), seed=0)
    run_one(s, policy, InstantExecutor(), scorer)
    t = s.tree
    # Three terminals, each reward = its score: root N = 3, W = 0.9 - 0.3 + 0.1 = 0.7
    assert t.root.visits == 3 and t.root.value_sum == pytest.approx(0.7)
    answers = terminal_answers(t)
    # Q(7) = (0.9 + 1*0.9) / (1 + 1) = 0.9 ; Q(8) = 0.1 ; Q(8') = -0.3
    assert [(a.answer, round(a.q, 6), a.verdict) for a in answers] == [
        ("7", 0.9, "ungraded"), ("8", 0.1, "ungraded"), ("8", -0.3, "ungraded")]
    assert best_answer(t) == "7"
    assert vote(answers, weighted=False) == "8"  # 2 votes against 1
    assert vote(answers[:2], weighted=False) == "7"  # 1 against 1: the answer listed first (best Q) wins
    # weighted by (Q + 1) / 2: '7' -> 0.95 ; '8' -> 0.55 + 0.35 = 0.90
    assert vote(answers, weighted=True) == "7"


def test_requests_follow_the_protocol_and_errors_say_what_is_wrong():
    s = TreeSearch(P, SearchConfig(rollouts=1, children=2), seed=0, grader=exact_grader)
    req = s.next_request()
    assert isinstance(req, ProposeRequest) and req.k == 2 and req.states[0].history == "" and req.states[0].tree_id == "p1"
    s.feed([[step(A2)]])
    req = s.next_request()
    assert isinstance(req, ExecBatch) and [r.node_key for r in req.requests] == ["1"]
    with pytest.raises(TypeError, match="the policy returned 'oops'; expected mcts.protocols.Proposal"):
        TreeSearch(P, SearchConfig(), seed=0, grader=exact_grader).feed([["oops"]])
    with pytest.raises(TypeError, match=r"for 1 proposal state\(s\); expected one list of mcts.protocols.Proposal"):
        TreeSearch(P, SearchConfig(), seed=0, grader=exact_grader).feed([step(A2)])  # not wrapped per state
    with pytest.raises(ValueError, match="2 outcomes for 1 exec requests"):
        s.feed([None, None])
    with pytest.raises(ValueError, match="pass a grader"):
        TreeSearch(P, SearchConfig(), seed=0)
    ppm = TreeSearch(P, SearchConfig(mode="ppm", rollouts=1, children=1), seed=0, grader=exact_grader)
    ppm.feed([[step(A2)]])
    ppm.feed(InstantExecutor().run(ppm.next_request().requests))
    assert isinstance(ppm.next_request(), ScoreBatch)
    with pytest.raises(ValueError, match=r"node 1 PPM score=1.7: must be a number in \[-1, 1\]"):
        ppm.feed([1.7])


def _searches(seed_base=0, mode="terminal"):
    cfg = SearchConfig(rollouts=6, children=3, mode=mode)
    return [TreeSearch(Problem(f"p{i}", f"q{i}", "4"), cfg, seed=seed_base + i, grader=exact_grader) for i in range(4)]


def test_waves_batch_all_trees_and_give_the_same_trees_as_running_each_alone():
    alone = [run_one(s, ScriptedPolicy(random_script), NamespaceExecutor()) for s in _searches()]
    waved = _searches()
    policy, ex, done = ScriptedPolicy(random_script), NamespaceExecutor(), []
    run_search(waved, policy, ex, on_done=lambda s: done.append(s.tree_id))
    for a, w in zip(alone, waved, strict=True):
        assert tree_to_rows(a.tree) == tree_to_rows(w.tree)  # identical trees, field for field
    assert sorted(done) == sorted(ex.released) == ["p0", "p1", "p2", "p3"]
    # one policy batch per wave: the first wave holds all 4 trees
    assert len(policy.batches[0]) == 4 and len(policy.batches) < sum(s.stats.expansions for s in waved)
    # a different seed gives a different tree
    other = _searches(seed_base=100)
    run_search(other, ScriptedPolicy(random_script), NamespaceExecutor())
    assert [tree_to_rows(s.tree) for s in other] != [tree_to_rows(s.tree) for s in waved]


class _MeetingPolicy(ScriptedPolicy):
    """Its first ``parties`` calls wait for one another (a barrier): they pass only if that many are in flight."""

    def __init__(self, script, parties):
        super().__init__(script)
        self.barrier, self.calls = threading.Barrier(parties, timeout=2), 0
        self._lock = threading.Lock()

    def propose(self, states, k):
        with self._lock:
            self.calls += 1
            first = self.calls <= self.barrier.parties
        if first:
            self.barrier.wait()
        return super().propose(states, k)


def test_lanes_run_the_trees_at_once_and_give_the_same_trees_as_waves():
    waved = _searches()
    run_search(waved, ScriptedPolicy(random_script), NamespaceExecutor())
    laned, ex, done = _searches(), Locked(NamespaceExecutor()), []
    policy = _MeetingPolicy(random_script, parties=4)  # all four trees' first expansions are in flight together
    run_lanes(laned, policy, ex, on_done=lambda s: done.append(s.tree_id), lanes=4)
    for w, la in zip(waved, laned, strict=True):
        assert tree_to_rows(w.tree) == tree_to_rows(la.tree)
    assert sorted(done) == sorted(ex.released) == ["p0", "p1", "p2", "p3"]
    assert all(len(b) == 1 for b in policy.batches)  # each lane asks for its own tree's expansion
    # one lane at a time cannot gather two callers: the barrier breaks, and the error reaches the caller
    with pytest.raises(threading.BrokenBarrierError):
        run_lanes(_searches(), _MeetingPolicy(random_script, parties=2), Locked(NamespaceExecutor()), lanes=1)
    with pytest.raises(ValueError, match="lanes=0: must be >= 1"):
        run_lanes(_searches(), ScriptedPolicy(random_script), Locked(NamespaceExecutor()), lanes=0)


def test_ppm_waves_send_one_scorer_batch_per_wave():
    waved = _searches(mode="ppm")
    scorer = TableScorer({}, default=0.25)
    policy = ScriptedPolicy(random_script)
    run_search(waved, policy, NamespaceExecutor(), scorer)
    assert len(scorer.batches) <= len(policy.batches)
    # non-terminal nodes carry the PPM's score; terminals and dead ends never do (rStar-Math)
    assert all(n.prior == (0.25 if n.status == "open" or n.expanded else None)
               for s in waved for n in s.tree.nodes.values() if n.id != 0)
    with pytest.raises(ValueError, match="needs a PPM scorer"):
        run_search(_searches(mode="ppm"), ScriptedPolicy(random_script), NamespaceExecutor())


def test_extend_grants_more_rollouts_to_a_finished_search():
    cfg = SearchConfig(rollouts=1, children=2, max_depth=3)
    s = TreeSearch(P, cfg, seed=0, grader=exact_grader)
    policy = ScriptedPolicy(lambda st: [step(f"# s\nx = {len(st.history)}"), step(f"# t\ny = {len(st.history)}")])
    run_one(s, policy, InstantExecutor())
    assert s.done and s.tree.rollouts == 1
    s.extend(2)
    assert not s.done
    run_one(s, policy, InstantExecutor())
    assert s.tree.rollouts == 3
    assert dataclasses.replace(cfg).rollouts == 1  # the config is untouched


def test_a_chain_through_an_exhausted_node_reopens_it():
    s1, s2, s3 = "# s1\nx = 1", "# s2\ny = 2", "# s3\nz = 3"
    script = TableScript({
        "": [Proposal(f"{s1}\n{s2}", None)],  # cut by the token limit: two open chain nodes
        s2: [final("# so \\boxed{3}")],
        s1: [Proposal(f"{s2}\n{s3}", None)],  # repeats s2, then continues below it
        s3: [final("# so \\boxed{4}")],
    })
    s = TreeSearch(P, SearchConfig(rollouts=3, children=1), seed=0, grader=exact_grader)
    run_one(s, ScriptedPolicy(script), NamespaceExecutor())
    t = s.tree
    # rollout 1: root -> chain s1 (1), s2 (2); continue to s2, expand: \boxed{3} (3, wrong): s2 closes, s1 stays
    # open (never expanded). rollout 2: expand s1: s2 is merged, s3 (4) goes under the closed s2 and re-opens
    # it; continue s1 -> s2 -> s3, expand: \boxed{4} (5, correct). Everything is closed again.
    assert [(n.id, n.parent) for n in t.nodes.values()] == [(0, -1), (1, 0), (2, 1), (3, 2), (4, 2), (5, 4)]
    assert s.stats.merged == 1 and t.nodes[5].verdict == "correct" and t.root.closed and t.rollouts == 2
    # outcomes -1 (node 3) and +1 (node 5): s2 N = 2, W = 0
    assert (t.nodes[2].visits, t.nodes[2].value_sum) == (2, 0.0)


def test_escalate_extends_an_open_tree_and_restarts_an_exhausted_one_with_a_new_seed():
    from mcts.search import escalate, solved

    # Open: every expansion leaves two open steps, never an answer; a rollout ends at a depth-4 dead end.
    policy = ScriptedPolicy(lambda st: [step(f"# s\nx = {len(st.history)}"), step(f"# t\ny = {len(st.history)}")])
    cfg = SearchConfig(rollouts=2, children=2, max_depth=4)
    s = run_one(TreeSearch(P, cfg, seed=0, grader=exact_grader), policy, InstantExecutor())
    assert s.done and not solved(s) and not s.tree.root.closed and s.tree.rollouts == 2
    same = escalate(s, 5, seed=99)
    assert same is s and not s.done  # extended in place to 5 in all: 3 more rollouts
    run_one(s, policy, InstantExecutor())
    assert s.tree.rollouts == 5 and s.tree.info.seed == 0
    # Exhausted: one wrong answer and nothing else, so the root closes after 1 of 4 rollouts.
    wrong = ScriptedPolicy(lambda st: [final("# so \\boxed{5}")])
    e = run_one(TreeSearch(P, SearchConfig(rollouts=4, children=1), seed=0, grader=exact_grader), wrong,
                InstantExecutor())
    assert e.tree.root.closed and e.tree.rollouts == 1
    fresh = escalate(e, 8, seed=99)
    assert fresh is not e and fresh.tree.info.seed == 99 and fresh.config.rollouts == 8 and len(fresh.tree) == 1
    assert fresh.next_request().states[0].seed != e.tree.info.seed  # sampling seeds derive from the new tree seed
    with pytest.raises(ValueError, match="escalate only a finished, unsolved search"):
        escalate(fresh, 16, seed=1)


def test_parallel_rollouts_expand_different_leaves_together_steered_by_virtual_loss():
    script = TableScript({
        "": [step(A2), step(A3)],
        A2: [final("# The answer is \\boxed{4}")],
        A3: [final("# The answer is \\boxed{6}")],
    })
    s = TreeSearch(P, SearchConfig(rollouts=4, children=2, parallel_rollouts=2), seed=0, grader=exact_grader)
    # Wave 1: only the root is open and unexpanded, so the second rollout waits for the next wave.
    req = s.next_request()
    assert isinstance(req, ProposeRequest) and len(req.states) == 1 and s.tree.rollouts == 1
    s.feed([script(req.states[0])])
    s.feed(NamespaceExecutor().run(s.next_request().requests))
    # Wave 2: rollout 1 continues into one child (an unvisited tie); rollout 2 starts from the root and, with a
    # virtual loss of -1 on rollout 1's child (Q -1 against the other child's 0), takes the other one.
    req = s.next_request()
    assert isinstance(req, ProposeRequest) and s.tree.rollouts == 2
    assert sorted(last_step(st.history) for st in req.states) == [A2, A3]
    s.feed([script(st) for st in req.states])
    ex = s.next_request()
    assert isinstance(ex, ExecBatch) and len(ex.requests) == 2  # both rollouts' steps in one executor batch
    s.feed(InstantExecutor().run(ex.requests))
    # Both answers graded and backed up once each; everything closed after 2 of the 4 rollouts.
    t = s.tree
    assert s.done and t.root.closed and t.rollouts == 2 and s.stats.expansions == 3
    assert (t.root.visits, t.root.value_sum) == (2, 0.0)
    assert {n.answer: n.verdict for n in t.terminals()} == {"4": "correct", "6": "wrong"}


def test_parallel_rollouts_keep_outcomes_exact_reproducible_and_batched():
    def searches(lanes, mode="terminal"):
        cfg = SearchConfig(rollouts=8, children=3, mode=mode, parallel_rollouts=lanes)
        return [TreeSearch(Problem(f"p{i}", f"q{i}", "4"), cfg, seed=i, grader=exact_grader) for i in range(4)]

    serial, parallel = searches(1), searches(3)
    p1, p3 = ScriptedPolicy(random_script), ScriptedPolicy(random_script)
    run_search(serial, p1, NamespaceExecutor())
    run_search(parallel, p3, NamespaceExecutor())
    for s in parallel:
        t = s.tree
        assert s.done and t.rollouts <= 8
        # each outcome backed up once: the root's N and W are those of the terminals (dead ends stay at their node)
        outcomes = [n.reward for n in t.terminals()]
        assert (t.root.visits, t.root.value_sum) == (len(outcomes), sum(outcomes))
        assert all(n.visits == sum(t.nodes[c].visits for c in n.children if t.nodes[c].status != "dead")
                   for n in t.nodes.values() if n.status == "open" and n.expanded)
    assert sum(s.stats.expansions for s in parallel) > 0
    # more than one expansion of a tree per policy call, so fewer calls for the same rollout budget
    assert max(len(b) for b in p3.batches) > len(parallel) and len(p3.batches) < len(p1.batches)
    # the same trees whether the trees run in waves or each on its own
    alone = [run_one(s, ScriptedPolicy(random_script), NamespaceExecutor()) for s in searches(3)]
    assert [tree_to_rows(a.tree) for a in alone] == [tree_to_rows(s.tree) for s in parallel]
    # PPM modes: one scorer batch per wave, holding every rollout's new nodes
    ppm, scorer = searches(3, mode="ppm"), TableScorer({}, default=0.25)
    policy = ScriptedPolicy(random_script)
    run_search(ppm, policy, NamespaceExecutor(), scorer)
    assert len(scorer.batches) <= len(policy.batches)
    assert all(n.prior == 0.25 for s in ppm for n in s.tree.nodes.values() if n.id != 0 and n.status == "open")
