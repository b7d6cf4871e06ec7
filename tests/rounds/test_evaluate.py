"""Evaluation with scripted fakes: every metric is hand-checkable.

Three held-out problems; a policy writes two steps per solution: ``x = <value>; print(x)``, then reads the
printed value back from the ``# output:`` line of its history and boxes it. So an answer reaches the final
step only through real execution and rendering, as in the search.

Scripted answers (None = the first step's code raises, so the chain has no answer):

    problem  reference  greedy  samples 0..3               mcts children 0, 1
    p1       5          5       6, 5, 5, None               6, 5
    p2       24         25      25, 25, 24, 26              25, 25
    p3       3          None    3, 3.0, 4, 3                3, 3.0

The fake PPM scores a complete solution by its boxed answer: 0.9 when right, -0.5 when wrong, except that
it wrongly likes p2's "26" (0.95); prefixes without an answer score 0.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass

import pytest

from mcts.protocols import ExecRequest, Proposal, SearchState
from mcts.steps import ANSWER_END, STEP_END, last_boxed
from rounds.eval_config import EvalConfig
from rounds.evaluate import GreedyFrom, TrainSolved, evaluate
from rounds.voting import normalise
from tests.mcts.mcts_fakes import Locked


@dataclass(frozen=True)
class P:
    id: str
    question: str
    answer: str


PROBLEMS = [P("p1", "What is 2 + 3?", "5"), P("p2", "What is 4 * 6?", "24"), P("p3", "What is 10 - 7?", "3")]
GREEDY = {"p1": "5", "p2": "25", "p3": None}
SAMPLES = {"p1": ["6", "5", "5", None], "p2": ["25", "25", "24", "26"], "p3": ["3", "3.0", "4", "3"]}
BY_QUESTION = {p.question: p for p in PROBLEMS}


def grade(problem, answer):
    return answer is not None and normalise(answer) == normalise(problem.answer)


def equivalent(a, b):
    return normalise(a) == normalise(b)


class ScriptedPolicy:
    """Writes the scripted answer of (problem, index); index = the chain's sample number (from its tree id
    'p1#sample2') or, for a k > 1 expansion, the candidate's position."""

    def __init__(self, script):
        self.script = script
        self.calls: list[int] = []  # batch size of each propose call

    def propose(self, states, k):
        self.calls.append(len(states))
        return [[self._step(s, j if k > 1 else self._index(s)) for j in range(k)] for s in states]

    @staticmethod
    def _index(state: SearchState) -> int:
        m = re.search(r"#\D*(\d+)$", state.tree_id)
        return int(m.group(1)) if m else 0

    def _step(self, state: SearchState, index: int) -> Proposal:
        problem = BY_QUESTION[state.question]
        if state.history == "":
            answer = self.script[problem.id]
            if isinstance(answer, list):
                answer = answer[index]
            code = "x = undefined_name" if answer is None else f"x = {answer}"
            return Proposal(f"# compute the result\n{code}\nprint(x)", STEP_END)
        printed = re.search(r"# output: (.*)", state.history).group(1)
        return Proposal(f"# The answer is \\boxed{{{printed}}}", ANSWER_END)


class ScriptedPPM:
    def __init__(self):
        self.calls: list[int] = []

    def score(self, states):
        self.calls.append(len(states))
        out = []
        for s in states:
            answer = last_boxed(s.history)
            problem = BY_QUESTION[s.question]
            if answer is None:
                out.append(0.0)
            elif problem.id == "p2" and answer == "26":
                out.append(0.95)
            else:
                out.append(0.9 if grade(problem, answer) else -0.5)
        return out


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    error: str | None
    stdout: str


class LiteralExecutor:
    """Test-only stand-in for the sandbox: understands exactly the scripted steps ('x = <literal>' and
    'print(x)'), keeping each node's x so a child runs in its parent's state as the real sandbox does."""

    def __init__(self):
        self.states: dict[tuple[str, str], dict] = {}
        self.released: list[str] = []

    def run(self, requests: list[ExecRequest]):
        out = []
        for r in requests:
            env = dict(self.states.get((r.tree_id, r.parent_key), {})) if r.parent_key else {}
            printed = []
            try:
                for line in r.code.splitlines():
                    if line.startswith("x = "):
                        env["x"] = ast.literal_eval(line[4:])
                    elif line == "print(x)":
                        printed.append(str(env["x"]))
            except ValueError:
                out.append(_Outcome(False, "NameError: name 'undefined_name' is not defined", ""))
                continue
            self.states[(r.tree_id, r.node_key)] = env
            out.append(_Outcome(True, None, "\n".join(printed)))
        return out

    def release(self, tree_id):
        self.released.append(tree_id)
        self.states = {k: v for k, v in self.states.items() if k[0] != tree_id}


@pytest.fixture(params=["sandbox", "literal"])
def executor(request):
    """The real sandbox (``pipeline.sandbox.SandboxPool``, one worker, no warm sympy so it starts fast)
    and the literal fake; the numbers must not depend on which one runs the steps."""
    if request.param == "literal":
        yield LiteralExecutor()
        return
    try:
        from pipeline.sandbox import SandboxConfig, SandboxPool
    except ImportError as e:  # the sandbox is another engineer's module; say so rather than fail here
        pytest.skip(f"pipeline.sandbox not importable: {e}")
    with SandboxPool(SandboxConfig(workers=1, timeout=5.0, warm_modules=("math",))) as pool:
        yield pool


def _run(executor, scorer, tmp_path=None, params=EvalConfig(maj_k=4, best_of_n=4, mcts_rollouts=2, mcts_children=2),
         **kw):
    return evaluate(PROBLEMS, round_index=kw.pop("round_index", 2), greedy=kw.pop("greedy", ScriptedPolicy(GREEDY)),
                    sampler=kw.pop("sampler", ScriptedPolicy(SAMPLES)), executor=executor, grade=grade,
                    equivalent=equivalent, scorer=scorer, params=params, out_dir=tmp_path, **kw)


def test_all_metrics_hand_checked(executor, tmp_path):
    greedy, sampler, ppm = ScriptedPolicy(GREEDY), ScriptedPolicy(SAMPLES), ScriptedPPM()
    res = _run(executor, ppm, tmp_path, greedy=greedy, sampler=sampler, train_solved=TrainSolved(7, 10))
    m = res["metrics"]
    # greedy: p1 boxes 5 (right), p2 boxes 25 (wrong), p3's step raises (no answer) -> 1/3
    assert m["greedy_pass1"] == pytest.approx(1 / 3)
    # maj@4: p1 votes {6:1, 5:2} -> 5 right; p2 {25:2, 24:1, 26:1} -> 25 wrong;
    #        p3 {3:3 ("3", "3.0", "3" share a normal form), 4:1} -> 3 right  => 2/3
    assert m["maj_at_k"] == pytest.approx(2 / 3)
    # best-of-4: p1 best of (6:-0.5, 5:0.9, 5:0.9) -> 5 right; p2 best is 26 (0.95) -> wrong;
    #            p3 best is 3 (0.9, first of the ties) -> right  => 2/3
    assert m["ppm_best_of_n"] == pytest.approx(2 / 3)
    # MCTS (2 children, 2 rollouts): p1 terminals 6 (Q -0.5) and 5 (Q 0.9) -> 5 right; p2 only 25 -> wrong;
    # p3 terminals 3 and 3.0 (both 0.9) -> 3 right  => 2/3
    assert m["ppm_mcts"] == pytest.approx(2 / 3)
    assert m["train_solved"] == pytest.approx(0.7)
    assert res["skipped"] == {}

    c = res["counts"]
    assert c["greedy"] == {"correct": 1, "problems": 3, "answered": 2}
    # 12 samples, one (p1 sample 3) raised -> 11 answered; pass@4: every problem has a right sample -> 3
    assert c["maj"] == {"k": 4, "correct": 2, "problems": 3, "answered_samples": 11, "pass_at_k": 3}
    assert c["best_of_n"] == {"n": 4, "correct": 2, "problems": 3, "scored": 11}
    assert c["mcts"] == {"rollouts": 2, "children": 2, "correct": 2, "problems": 3, "answered": 3, "terminals": 5}
    assert c["train"] == {"solved": 7, "problems": 10}

    rows = {r["id"]: r for r in res["problems"]}
    assert (rows["p1"]["greedy_answer"], rows["p3"]["greedy_answer"]) == ("5", None)
    assert (rows["p2"]["maj_answer"], rows["p2"]["maj_votes"]) == ("25", 2)
    assert (rows["p2"]["bon_answer"], rows["p2"]["bon_score"]) == ("26", 0.95)
    assert rows["p1"]["mcts_answer"] == "5" and rows["p1"]["mcts_q"] == pytest.approx(0.9)

    # eval.json holds the same numbers; the temp file was renamed away
    assert json.loads((tmp_path / "eval.json").read_text()) == res
    assert [f.name for f in tmp_path.iterdir()] == ["eval.json"]
    assert set(res["wall_s"]) == {"greedy", "samples", "best_of_n", "mcts", "total"}


class NoPolicy:
    def propose(self, states, k):
        raise AssertionError("greedy chains were decoded although greedy_from holds them")


def test_greedy_from_an_earlier_evaluation_is_taken_not_decoded(executor):
    earlier = _run(executor, None, params=EvalConfig(maj_k=2, best_of_n=2), greedy_only_reason="greedy-only round")
    full = _run(executor, ScriptedPPM(), params=EvalConfig(maj_k=4, best_of_n=4, mcts_rollouts=2, mcts_children=2),
                greedy=NoPolicy(), greedy_from=GreedyFrom(round=1, problems=list(reversed(earlier["problems"]))))
    assert full["metrics"]["greedy_pass1"] == earlier["metrics"]["greedy_pass1"] == pytest.approx(1 / 3)
    assert full["counts"]["greedy"] == {"correct": 1, "problems": 3, "answered": 2, "same_as_round": 1}
    assert [(r["greedy_answer"], r["greedy_correct"]) for r in full["problems"]] == [("5", True), ("25", False),
                                                                                      (None, False)]
    assert "greedy" not in full["wall_s"]
    # the rest is measured as usual: the same numbers as the hand-checked full evaluation
    assert full["metrics"]["maj_at_k"] == full["metrics"]["ppm_mcts"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"greedy_from \(round 1\) has no greedy result for 1 of 3 problems"):
        _run(executor, None, greedy=NoPolicy(), greedy_only_reason="x",
             greedy_from=GreedyFrom(round=1, problems=earlier["problems"][:2]))


class LaneScriptedPolicy(ScriptedPolicy):
    concurrent_calls = True  # as the transformers engine: callers on several threads share its running batch


def test_chains_in_lanes_give_the_numbers_of_waves(executor):
    executor = Locked(LiteralExecutor()) if isinstance(executor, LiteralExecutor) else executor
    params = EvalConfig(maj_k=4, best_of_n=4, mcts_rollouts=2, mcts_children=2)
    waves = _run(executor, ScriptedPPM(), params=params)
    greedy, sampler, said = LaneScriptedPolicy(GREEDY), LaneScriptedPolicy(SAMPLES), []
    lanes = _run(executor, ScriptedPPM(), params=dataclasses.replace(params, chain_lanes=3), greedy=greedy,
                 sampler=sampler, log=said.append)
    assert lanes["metrics"] == waves["metrics"] and lanes["problems"] == waves["problems"]
    assert lanes["chain_lanes"] == 3 and "chain_lanes" not in waves
    # every greedy call is one chain's own step (waves send the three problems' first steps together)
    assert set(greedy.calls) == {1}
    # a policy that does not batch concurrent callers gets waves, and the log says the setting did nothing
    plain = _run(executor, None, params=dataclasses.replace(params, chain_lanes=3), log=said.append)
    assert "chain_lanes" not in plain and plain["metrics"]["maj_at_k"] == waves["metrics"]["maj_at_k"]
    assert any("eval.chain_lanes=3 has no effect here: ScriptedPolicy does not batch concurrent callers" in m
               for m in said)


def test_batching_one_policy_batch_per_wave(executor):
    greedy, sampler, ppm = ScriptedPolicy(GREEDY), ScriptedPolicy(SAMPLES), ScriptedPPM()
    _run(executor, ppm, greedy=greedy, sampler=sampler)
    # greedy: wave 1 = 3 roots; wave 2 = the second steps of p1, p2 (p3 raised and ended)
    assert greedy.calls == [3, 2]
    # sampler: chains wave 1 = 3 x 4 roots, wave 2 = 11 surviving chains; then MCTS: 3 roots, then the
    # 3 trees' first child, then their second child (p2's two identical steps merged: nothing left)
    assert sampler.calls[:2] == [12, 11]
    assert sampler.calls[2:] == [3, 3, 2]
    # PPM: one batch of 11 complete solutions for best-of-N, then MCTS waves: 3 x 2 first steps (p2's
    # merged: 5), then one terminal per tree (3), then the remaining terminals of p1 and p3 (2)
    assert ppm.calls == [11, 5, 3, 2]
    # every chain's executor states were released when it finished: 3 greedy + 12 samples + 3 MCTS trees
    if isinstance(executor, LiteralExecutor):
        assert len(executor.released) == 18 and not executor.states
    else:
        assert executor.stats()["live_states"] == 0


def test_without_ppm_skips_with_reason(executor, tmp_path):
    res = _run(executor, None, tmp_path, round_index=0)
    m = res["metrics"]
    assert m["ppm_best_of_n"] is None and m["ppm_mcts"] is None and m["train_solved"] is None
    assert res["skipped"] == {"ppm_best_of_n": "no PPM (round 0 is the base model)",
                              "ppm_mcts": "no PPM (round 0 is the base model)",
                              "train_solved": "no training search (round 0 is the base model)"}
    assert "best_of_n" not in res["counts"] and "mcts" not in res["counts"]
    # only maj_k samples are drawn when there is no PPM to rank them
    assert res["counts"]["samples"]["per_problem"] == 4
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["maj_at_k"] == pytest.approx(2 / 3)


def test_k_and_n_take_the_first_samples(executor):
    # maj@2 over samples 0..1: p1 {6, 5} tie -> 6 wrong; p2 {25, 25} wrong; p3 {3, 3.0} right -> 1/3
    # best-of-3 over samples 0..2: p1 (6:-0.5, 5:0.9, 5:0.9) -> right; p2 (25, 25, 24:0.9) -> right;
    # p3 (3, 3.0, 4) -> 3 right => 3/3
    res = _run(executor, ScriptedPPM(), params=EvalConfig(maj_k=2, best_of_n=3, mcts_rollouts=1, mcts_children=1))
    assert res["metrics"]["maj_at_k"] == pytest.approx(1 / 3)
    assert res["metrics"]["ppm_best_of_n"] == pytest.approx(1.0)
    assert res["counts"]["samples"]["per_problem"] == 3


def test_reproducible(executor):
    a = _run(executor, ScriptedPPM())
    b = _run(LiteralExecutor(), ScriptedPPM())
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


def test_input_errors(executor):
    with pytest.raises(ValueError, match="maj_k=0: must be an integer >= 1"):
        EvalConfig(maj_k=0)
    with pytest.raises(ValueError, match="train_solved.solved=11"):
        TrainSolved(11, 10)
    with pytest.raises(ValueError, match="no held-out problems"):
        evaluate([], round_index=1, greedy=ScriptedPolicy(GREEDY), sampler=ScriptedPolicy(SAMPLES),
                 executor=executor, grade=grade, equivalent=None)
    with pytest.raises(ValueError, match=r"duplicate problem ids \['p1'\]"):
        evaluate([PROBLEMS[0], PROBLEMS[0]], round_index=1, greedy=ScriptedPolicy(GREEDY),
                 sampler=ScriptedPolicy(SAMPLES), executor=executor, grade=grade, equivalent=None)


def test_bad_ppm_score_is_reported(executor):
    class Broken(ScriptedPPM):
        def score(self, states):
            return [2.0] * len(states)

    with pytest.raises(ValueError, match=r"PPM score of problem p1 sample 0=2.0: must be a number in \[-1, 1\]"):
        _run(executor, Broken())


def test_with_the_real_grader(executor):
    """The production grader and equivalence (``data.grade`` / ``data.is_equivalent``) give the same numbers."""
    data = pytest.importorskip("data")
    if not all(hasattr(data, name) for name in ("grade", "is_equivalent", "Problem")):
        pytest.skip("data.grade / data.is_equivalent / data.Problem not there yet (another engineer's module)")
    problems = [data.Problem(id=p.id, question=p.question, answer=p.answer, source="test") for p in PROBLEMS]
    res = evaluate(problems, round_index=1, greedy=ScriptedPolicy(GREEDY), sampler=ScriptedPolicy(SAMPLES),
                   executor=executor, grade=data.grade, equivalent=data.is_equivalent, scorer=ScriptedPPM(),
                   params=EvalConfig(maj_k=4, best_of_n=4, mcts_rollouts=2, mcts_children=2))
    # the same hand-checked values as test_all_metrics_hand_checked: 1/3, 2/3, 2/3, 2/3
    assert [res["metrics"][k] for k in ("greedy_pass1", "maj_at_k", "ppm_best_of_n", "ppm_mcts")] == \
        pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_registry_strategies_run_beside_the_four_metrics(tmp_path):
    params = EvalConfig(maj_k=4, best_of_n=4, mcts_rollouts=2, mcts_children=2,
                        strategies=("majority@4", "weighted_majority@4"))
    res = _run(LiteralExecutor(), ScriptedPPM(), tmp_path, params=params)
    s = res["strategies"]
    # majority@4 through the registry = maj@4 above: 2/3
    assert s["majority@4"]["correct"] == 2 and res["metrics"]["maj_at_k"] == pytest.approx(2 / 3)
    # PPM-weighted vote, weight (s + 1) / 2: p1 5 (2 x 0.95) beats 6 (0.25) -> right;
    # p2 26 (0.975) > 24 (0.95) > 25 (2 x 0.25 = 0.5) -> wrong; p3 3 (3 x 0.95) beats 4 -> right  => 2/3
    assert s["weighted_majority@4"]["correct"] == 2
    assert [p["weighted_majority@4_answer"] for p in res["problems"]] == ["5", "26", "3"]
    assert json.loads((tmp_path / "eval.json").read_text())["strategies"] == s
    without = _run(LiteralExecutor(), None, params=params)
    assert "weighted_majority@4" in without["skipped"] and "majority@4" in without["strategies"]
    with pytest.raises(ValueError, match="strategies=\\['nope@2'\\]: unknown strategy 'nope'"):
        EvalConfig(strategies=("nope@2",))
