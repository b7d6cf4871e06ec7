"""End to end: a scripted policy, the real sandbox (pipeline.sandbox) and the real grader (data.grade)
over built-in arithmetic problems; checks the extracted SFT rows and preference pairs."""

import pytest
from mcts_fakes import ScriptedPolicy, final, step

import data
from data import grade, load_problems
from mcts.config import ExtractConfig, SearchConfig
from mcts.extract import extract
from mcts.search import TreeSearch
from mcts.seeds import tree_seed
from mcts.serialize import tree_from_rows, tree_to_rows
from mcts.wave import run_search


@pytest.fixture(autouse=True, scope="module")
def _stop_grading_workers():
    yield
    data.shutdown()  # the shared grader's worker processes: leave none running

WRONG = "987654321"


def _script(problems):
    """For each question: one good first step, one that computes a wrong value, one that crashes; after the
    good step, the right answer and a wrong one; after the bad step, its (wrong) value."""
    by_question = {p.question: p for p in problems}

    def script(state):
        p = by_question[state.question]
        if state.history == "":
            return [
                step(f"# Work out the result.\nresult = {p.answer!r}\nprint(result)"),
                step(f"# Guess the result.\nresult = {WRONG!r}\nprint(result)"),
                step("# Divide by the count of nothing.\nresult = 1 / 0"),
            ]
        if f"# output: {p.answer}\n" in state.history:
            return [final(f"# The answer is \\boxed{{{p.answer}}}"), final(f"# The answer is \\boxed{{{WRONG}}}")]
        return [final(f"# The answer is \\boxed{{{WRONG}}}")]

    return script


def test_search_with_the_real_sandbox_and_grader():
    from pipeline.sandbox import SandboxConfig, SandboxPool

    problems = list(load_problems("builtin:arithmetic", n=3, seed=0))
    assert len(problems) == 3
    cfg = SearchConfig(rollouts=6, children=3)
    searches = [TreeSearch(p, cfg, tree_seed(0, 1, p.id), grade, round_index=1) for p in problems]
    policy = ScriptedPolicy(_script(problems))
    with SandboxPool(SandboxConfig(workers=2, timeout=10.0)) as pool:
        run_search(searches, policy, pool)
    assert len(policy.batches[0]) == 3  # the first wave asked for all three roots at once
    for s, p in zip(searches, problems, strict=True):
        t = s.tree
        assert s.done and t.root.closed, f"{p.id}: search ended with the root open after {t.rollouts} rollouts"
        # the crashing candidate is recorded with the sandbox's error, not kept
        assert [f.stage for f in t.failures] == ["exec"] and "ZeroDivisionError" in t.failures[0].error
        good, bad = t.nodes[1], t.nodes[2]
        assert good.stdout.strip() == p.answer and bad.stdout.strip() == WRONG
        verdicts = sorted((n.answer, n.verdict) for n in t.terminals())
        assert verdicts == sorted([(p.answer, "correct"), (WRONG, "wrong"), (WRONG, "wrong")])
        # Outcomes +1, -1 under the good step and -1 under the bad one:
        # root N = 3, W = -1; good step N = 2, W = 0 (Q 0); bad step N = 1, W = -1 (Q -1)
        assert (t.root.visits, t.root.value_sum) == (3, -1.0)
        assert (good.visits, good.value_sum, bad.visits, bad.value_sum) == (2, 0.0, 1, -1.0)

        ex = extract(tree_from_rows(tree_to_rows(t)), ExtractConfig(min_margin=0.5))
        assert len(ex.sft) == 1  # one correct trajectory: good step -> right answer
        sft = ex.sft[0]
        assert sft.question == p.question and sft.prefix == ""
        assert sft.completion.startswith("# Work out the result.\n") and f"\\boxed{{{p.answer}}}" in sft.completion
        assert f"# output: {p.answer}\n" in sft.completion
        # mean step Q = (Q(good) + Q(answer)) / 2 = (0 + 1) / 2
        assert (sft.q_mean, sft.q_min) == (0.5, 0.0)
        steps = sorted((x.depth, x.q_chosen, x.q_rejected) for x in ex.pairs if x.kind == "step")
        # root: good (Q 0) vs bad (Q -1), margin 1. Under good: right (+1) vs wrong (-1), margin 2, but the
        # two final steps differ only in the boxed number (< 20 characters): rStar's filter drops the pair.
        assert steps == [(1, 0.0, -1.0)]
        finals = [x for x in ex.pairs if x.kind == "final"]
        # right trajectory (mean .5) vs the two wrong ones: bad -> wrong (mean -1, margin 1.5) is kept;
        # good -> wrong (mean -.5, margin 1.0) shares the first step, so it is < 20 characters away: dropped
        assert sorted(round(x.margin, 6) for x in finals) == [1.5]
        assert all(f"\\boxed{{{p.answer}}}" in x.chosen and WRONG in x.rejected for x in finals)
