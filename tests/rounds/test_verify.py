"""Tool-integrated verification in the real sandbox: right, wrong and wrong-but-plausible candidates."""

from __future__ import annotations

import re

import pytest
from strategy_fakes import P, ScriptPolicy, boxed, index_of, step

from rounds.solve import solve
from rounds.strategies.base import Candidate, SolveContext, StepRec
from rounds.strategies.verify import Verifier, answer_consistent
from rounds.voting import normalise

Q = "What is 2 + 3?"


@pytest.fixture(scope="module")
def pool():
    from pipeline.sandbox import SandboxConfig, SandboxPool

    with SandboxPool(SandboxConfig(workers=1, timeout=5.0, warm_modules=("math",))) as p:
        yield p


def cand(code: str, stdout: str, answer: str | None) -> Candidate:
    text = f"# compute\n{code}"
    final = StepRec(f"# The answer is \\boxed{{{answer}}}", "", "", True)
    return Candidate(answer, (StepRec(text, code, stdout, False), final))


def checker(checks: dict[str, str]):
    """Writes the check program of a candidate by its answer ('# Check: substitute the answer X back ...')."""
    def script(state, k):
        answer = re.search(r"substitute the answer (\S+) back", state.history).group(1)
        return [step(f"# check\n{checks[answer]}")]
    return ScriptPolicy(script)


def test_answer_consistency_rules():
    assert answer_consistent("5", "5\n")
    assert answer_consistent("5.0", "x is 5")  # same number in normal form
    assert not answer_consistent("25", "24\n")  # the code computed 24; 25 was typed in
    assert answer_consistent("25", "")  # printed nothing: nothing to compare
    assert answer_consistent("\\frac{1}{2}", "0.5")  # not a plain number: not checked this way


def test_rerun_drops_wrong_and_plausible_but_keeps_right(pool):
    cands = [cand("x = 2 + 3\nprint(x)", "5\n", "5"),  # right
             cand("x = 10 // 0\nprint(x)", "", "0"),  # wrong: its code does not run
             cand("x = 4 * 6\nprint(x)", "24\n", "25"),  # wrong but plausible: the answer is not what it computed
             cand("x = 1", "", None)]  # no answer
    verdicts = Verifier(pool).verify([P("p", Q, "5")], [cands])[0]
    assert [v.ok for v in verdicts] == [True, False, False, False]
    assert verdicts[1].reason.startswith("re-run failed: ZeroDivisionError"), verdicts[1].reason
    assert "not among the numbers its code printed" in verdicts[2].reason
    assert verdicts[3].reason == "no answer"


def test_check_program_catches_a_consistent_wrong_answer(pool):
    cands = [cand("x = 2 + 3\nprint(x)", "5\n", "5"), cand("x = 2 * 3\nprint(x)", "6\n", "6"),
             cand("x = 2 - 3\nprint(x)", "-1\n", "-1")]
    policy = checker({"5": "print(x == 2 + 3)", "6": "assert x == 2 + 3, x", "-1": "print(x + 3 == 2)"})
    verdicts = Verifier(pool, policy).verify([P("p", Q, "5")], [cands])[0]
    # 6 re-runs fine and matches its output: only the check program (an assert) catches it; the check of -1
    # prints True (a wrong check): a check program can be fooled, and the result says what removed what
    assert [v.ok for v in verdicts] == [True, False, True]
    assert verdicts[1].reason.startswith("check program failed: AssertionError"), verdicts[1].reason


def test_solve_with_verify_counts_wrong_and_right_removed(pool):
    # samples: 0 right (5); 1 prints 6 but boxes 7; 2, 3 compute 7 (consistent); 4 right (5)
    plan = [(5, None), (6, 7), (7, None), (7, None), (5, None)]

    def script(state, k):
        if "# Check:" in state.history:
            j = int(state.tree_id.rsplit("verify", 1)[1])
            # 7 fails its assert; sample 4's check is wrong and prints False: a right answer wrongly removed
            return [step("# check\nassert x == 2 + 3" if j in (2, 3) else
                         f"# check\nprint({'False' if j == 4 else 'x == 5'})")]
        computed, box = plan[index_of(state)]
        if state.history == "":
            return [step(f"# compute the sum\nx = {computed}\nprint(x)")]
        printed = re.search(r"# output: (.*)", state.history).group(1)
        return [boxed(str(box) if box is not None else printed)]

    policy = ScriptPolicy(script)

    def grade(problem, answer):
        return answer is not None and normalise(answer) == normalise(problem.answer)
    ctx = SolveContext(policy, pool)
    plain = solve([P("p", Q, "5")], "majority", 5, ctx, grade=grade)[0]
    assert (plain["answer"], plain["correct"]) == ("7", False)  # 7 has 3 votes (samples 1, 2, 3)
    row = solve([P("p", Q, "5")], "majority", 5, ctx, grade=grade, verifier=Verifier(pool, policy))[0]
    # removed: 1 (7 is not the printed 6), 2 and 3 (assert fails) -> 3 wrong; 4 (check prints False) -> 1 right
    assert (row["verify_removed_wrong"], row["verify_removed_right"], row["verified"]) == (3, 1, 1)
    assert (row["answer"], row["correct"], row["verify_fallback"]) == ("5", True, False)
