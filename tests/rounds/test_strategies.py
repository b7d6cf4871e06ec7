"""Each test-time strategy on a scripted policy and PPM, with hand-computed expectations.

Chains: a sampled chain j writes ``x = <computed>; print(x)``, then boxes an answer (by default what was
printed), so an answer reaches the final step through real execution of the step, as in the search.
"""

from __future__ import annotations

import re

import pytest
from strategy_fakes import NamespaceExecutor, P, ScriptPolicy, TableScorer, boxed, index_of, step

from rounds.solve import solve, summarise
from rounds.strategies import STRATEGIES, get_strategy
from rounds.strategies.auto import FALLBACK, ChoiceTable, build_choice_table, difficulty_bin
from rounds.strategies.base import Candidate, SolveContext, TokenMeter, aggregate
from rounds.strategies.beam import beam_shape
from rounds.voting import normalise

Q = "What is 2 + 3?"


def grade(problem, answer):
    return answer is not None and normalise(answer) == normalise(problem.answer)


def chain_script(samples: dict[str, list[tuple[object, object]]]):
    """samples[pid][j] = (computed value or None = the step raises, boxed answer or None = box the output)."""
    def script(state, k):
        computed, box = samples[state.tree_id.split("#")[0]][index_of(state)]
        if state.history == "":
            code = "x = undefined_name" if computed is None else f"x = {computed}"
            return [step(f"# compute the sum\n{code}\nprint(x)")] * k
        printed = re.search(r"# output: (.*)", state.history).group(1)
        return [boxed(str(box) if box is not None else printed)] * k
    return script


def ctx_for(policy, scorer=None, executor=None, **kw):
    return SolveContext(policy, executor or NamespaceExecutor(), scorer, **kw)


def answers_of(cands):
    return [c.answer for c in cands]


def test_registry_holds_every_strategy_and_rejects_unknown_names():
    assert list(STRATEGIES) == ["greedy", "majority", "weighted_majority", "best_of_n", "beam", "dvts", "mcts"]
    with pytest.raises(ValueError, match="unknown strategy 'bogus'; choose one of: greedy, majority"):
        get_strategy("bogus")


def test_greedy_uses_the_greedy_policy_once():
    sampler = ScriptPolicy(chain_script({"p": [(9, None)]}))
    greedy = ScriptPolicy(chain_script({"p": [(5, None)]}))
    ctx = ctx_for(sampler, greedy=greedy)
    cands = STRATEGIES["greedy"].generate([P("p", Q, "5")], 8, ctx)  # the budget buys nothing more
    assert answers_of(cands[0]) == ["5"] and sampler.asked == []
    assert len(greedy.asked) == 2  # one chain: the step, then the answer


def test_majority_and_weighted_majority_disagree_as_hand_computed():
    # samples box 5, 7, 5, 7, 7 (a failing chain is no candidate: sample 5 raises)
    samples = {"p": [(5, None), (7, None), (5, None), (7, None), (7, None), (None, None)]}
    scorer = TableScorer({"# The answer is \\boxed{5}": 0.9, "# The answer is \\boxed{7}": -0.5})
    ctx = ctx_for(ScriptPolicy(chain_script(samples)), scorer)
    problems = [P("p", Q, "5")]
    maj = STRATEGIES["majority"]
    cands = maj.generate(problems, 6, ctx)
    assert answers_of(cands[0]) == ["5", "7", "5", "7", "7"]
    assert maj.select(cands[0], ctx) == "7"  # 7 has 3 votes, 5 has 2
    wm = STRATEGIES["weighted_majority"]
    cands = wm.generate(problems, 6, ctx)
    assert [c.score for c in cands[0]] == [0.9, -0.5, 0.9, -0.5, -0.5]
    # weights (s + 1) / 2 summed: 5 -> 2 * 0.95 = 1.9; 7 -> 3 * 0.25 = 0.75  => 5
    assert wm.select(cands[0], ctx) == "5"


def test_weighted_vote_sums_scores_not_counts():
    steps = ()
    cands = [Candidate("4", steps, 0.2), Candidate("4", steps, 0.2), Candidate("9", steps, 0.8)]
    # 4: 2 * (1.2 / 2) = 1.2;  9: 1.8 / 2 = 0.9  => 4, although 9 has the single best score
    assert STRATEGIES["weighted_majority"].select(cands, ctx_for(None)) == "4"
    cands[1] = Candidate("4", steps, -0.6)  # 4: 0.6 + 0.2 = 0.8 < 0.9  => 9
    assert STRATEGIES["weighted_majority"].select(cands, ctx_for(None)) == "9"


def test_aggregates_hand_computed():
    assert aggregate((0.9, -0.2, 0.8), "last") == 0.8
    assert aggregate((0.9, -0.2, 0.8), "min") == -0.2
    # prod of (s + 1) / 2: 0.95 * 0.4 * 0.9 = 0.342
    assert aggregate((0.9, -0.2, 0.8), "prod") == pytest.approx(0.342)
    assert aggregate((), "last") is None


@pytest.mark.parametrize("how,expected", [("last", "5"), ("min", "7"), ("prod", "7")])
def test_best_of_n_aggregation_changes_the_pick(how, expected):
    # sample 0: step 'x = 5' scores -0.6, its answer 0.7; sample 1: step 'x = 7' 0.4, its answer 0.6
    # last: 0.7 vs 0.6 -> 5;  min: -0.6 vs 0.4 -> 7;  prod: 0.2 * 0.85 = 0.17 vs 0.7 * 0.8 = 0.56 -> 7
    scorer = TableScorer({"# compute the sum\nx = 5\nprint(x)": -0.6, "# The answer is \\boxed{5}": 0.7,
                          "# compute the sum\nx = 7\nprint(x)": 0.4, "# The answer is \\boxed{7}": 0.6})
    ctx = ctx_for(ScriptPolicy(chain_script({"p": [(5, None), (7, None)]})), scorer, aggregate=how)
    bon = STRATEGIES["best_of_n"]
    cands = bon.generate([P("p", Q, "5")], 2, ctx)
    # 'last' scores whole solutions only (2 states); the others every prefix (2 steps x 2 chains)
    assert len(scorer.scored) == (2 if how == "last" else 4)
    assert bon.select(cands[0], ctx) == expected


def beam_world():
    """Root: steps a, b, c, d (c raises). From b: answers 12 (0.2), 13 (0.9); from d: 14 (0.7), 15 (-0.1);
    from a: 10, 11. PPM of the first steps: a 0.1, b 0.8, d 0.5."""
    first = {n: f"# try {n}\n{n} = 1{'/0' if n == 'c' else ''}\nprint({n})" for n in "abcd"}
    answers = {"a": ("10", "11"), "b": ("12", "13"), "d": ("14", "15")}

    def script(state, k):
        if state.history == "":
            return [step(first[n]) for n in "abcd"]
        name = re.search(r"# try (\w)", state.history).group(1)
        return [boxed(a) for a in answers[name]]
    table = {first["a"]: 0.1, first["b"]: 0.8, first["d"]: 0.5}
    table.update({f"# The answer is \\boxed{{{a}}}": s for a, s in
                  (("10", 0.0), ("11", 0.0), ("12", 0.2), ("13", 0.9), ("14", 0.7), ("15", -0.1))})
    return ScriptPolicy(script), TableScorer(table), first


def test_beam_keeps_the_top_k_by_ppm():
    assert beam_shape(4, 2) == (2, 2) and beam_shape(16, 4) == (4, 4) and beam_shape(2, 4) == (1, 2)
    policy, scorer, first = beam_world()
    ctx = ctx_for(policy, scorer, expansion=2)
    beam = STRATEGIES["beam"]
    cands = beam.generate([P("p", Q, "13")], 4, ctx)
    # N = 4, M = 2: the root gets 4 proposals; c fails (not scored); keep N // M = 2 of a 0.1, b 0.8, d 0.5
    assert policy.asked[0][2] == 4
    expanded = sorted(re.search(r"# try (\w)", h).group(1) for _, h, _k in policy.asked[1:])
    assert expanded == ["b", "d"] and all(k == 2 for *_, k in policy.asked[1:])
    assert first["c"] not in scorer.scored
    assert sorted(answers_of(cands[0])) == ["12", "13", "14", "15"]
    assert beam.select(cands[0], ctx) == "13"  # the best complete solution: 0.9


def test_dvts_subtrees_are_disjoint_and_each_keeps_one_beam():
    first = {"a": "# start a\na = 1\nprint(a)", "b": "# start b\nb = 2\nprint(b)"}
    mid = {"a2": "# go a2\na2 = a + 1\nprint(a2)", "a3": "# go a3\na3 = a + 2\nprint(a3)"}

    def script(state, k):
        h = state.history
        if h == "":
            return [step(first["a"]), step(first["b"]), step(first["a"])][:k]
        if "# go a3" in h:
            return [boxed("30"), boxed("31")]
        if "# start a" in h:
            return [step(mid["a2"]), step(mid["a3"])]
        return [boxed("20"), boxed("21")]
    table = {first["a"]: 0.1, first["b"]: 0.2, mid["a2"]: 0.3, mid["a3"]: 0.6,
             "# The answer is \\boxed{30}": 0.95, "# The answer is \\boxed{31}": 0.1,
             "# The answer is \\boxed{20}": 0.4, "# The answer is \\boxed{21}": 0.5}
    policy = ScriptPolicy(script)
    ctx = ctx_for(policy, TableScorer(table), expansion=2)
    dvts = STRATEGIES["dvts"]
    cands = dvts.generate([P("p", Q, "30")], 4, ctx)[0]
    # N = 4, M = 2: 2 subtrees rooted at the root's first 2 proposals (a, b); each expands into 2 per depth
    assert policy.asked[0][2] == 2
    groups = {c.group for c in cands}
    assert groups == {0, 1}
    roots = {g: {c.steps[0].text for c in cands if c.group == g} for g in groups}
    assert roots == {0: {first["a"]}, 1: {first["b"]}}  # disjoint: each subtree holds one first step
    # subtree a keeps only a3 (0.6 > 0.3): a2 is never expanded
    assert not any("# go a2" in h for _, h, _k in policy.asked)
    assert sorted(answers_of(cands)) == ["20", "21", "30", "31"]
    assert dvts.select(cands, ctx) == "30"


def test_dvts_merges_identical_first_steps_into_one_subtree():
    def script(state, k):
        return [step("# same\ns = 1\nprint(s)")] * k if state.history == "" else [boxed("1")] * k
    ctx = ctx_for(ScriptPolicy(script), TableScorer({}), expansion=2)
    cands = STRATEGIES["dvts"].generate([P("p", Q, "1")], 4, ctx)[0]
    assert {c.group for c in cands} == {0} and answers_of(cands) == ["1"]


def test_mcts_ranks_terminals_by_q():
    def script(state, k):
        return [boxed("6"), boxed("5")]
    scorer = TableScorer({"# The answer is \\boxed{5}": 0.9, "# The answer is \\boxed{6}": -0.5})
    ctx = ctx_for(ScriptPolicy(script), scorer, mcts_children=2)
    mcts = STRATEGIES["mcts"]
    cands = mcts.generate([P("p", Q, "5")], 2, ctx)[0]
    assert [(c.answer, c.score) for c in cands] == [("5", 0.9), ("6", -0.5)]  # test-time: Q = the PPM score
    assert mcts.select(cands, ctx) == "5"


def test_ppm_strategies_without_a_ppm_say_so():
    ctx = ctx_for(ScriptPolicy(chain_script({"p": [(5, None)]})))
    for name in ("weighted_majority", "best_of_n", "beam", "dvts", "mcts"):
        with pytest.raises(ValueError, match="PPM"):
            solve([P("p", Q, "5")], name, 2, ctx)


def test_solve_rows_grade_and_count_tokens():
    samples = {"p": [(5, None), (6, None)], "q": [(7, None), (7, None)]}
    meter = TokenMeter(ScriptPolicy(chain_script(samples)), count=lambda text: 1)  # one token per proposal
    ctx = ctx_for(meter)
    rows = solve([P("p", Q, "5"), P("q", "What is 3 + 4?", None)], "majority", 2, ctx, meter=meter, grade=grade,
                 batch=1)
    assert [(r["problem_id"], r["answer"], r["correct"]) for r in rows] == [("p", "5", True), ("q", "7", None)]
    assert [r["tokens"] for r in rows] == [4, 4]  # 2 chains x (step + answer)
    lines = summarise(rows)
    assert lines[0]["correct"] == 1 and lines[0]["graded"] == 1 and lines[0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="budget 0: must be an integer >= 1"):
        solve([P("p", Q, "5")], "majority", 0, ctx)


def test_difficulty_bins_and_choice_table():
    # probe_k = 4: 4 or 3 agreeing = easy, 2 = medium, 0-1 = hard
    assert [difficulty_bin(a) for a in (1.0, 0.75, 0.5, 0.25, 0.0)] == ["easy", "easy", "medium", "hard", "hard"]
    rows = [dict(problem_id="e", strategy="majority", budget=2, correct=True, tokens=10),
            dict(problem_id="e", strategy="best_of_n", budget=2, correct=True, tokens=8),
            dict(problem_id="h", strategy="majority", budget=2, correct=False, tokens=9),
            dict(problem_id="h", strategy="beam", budget=2, correct=True, tokens=30),
            dict(problem_id="x", strategy="beam", budget=2, correct=None, tokens=30)]
    table = build_choice_table(rows, {"e": "easy", "h": "hard", "x": "hard"}, 4, list(STRATEGIES))
    # easy: both right, best_of_n spent fewer tokens (8 < 10); hard: only beam right
    assert table.choice == {"easy": {2: "best_of_n"}, "hard": {2: "beam"}}
    assert table.pick("hard", 8) == "beam" and table.pick("hard", 1) == "beam"  # nearest calibrated budget
    assert table.pick("medium", 2) == FALLBACK
    assert ChoiceTable.from_json(table.to_json()).choice == table.choice


def test_auto_probes_difficulty_and_runs_the_bins_choice():
    samples = {"e": [(5, None)] * 4, "h": [(5, None), (6, None), (7, None), (8, None)]}
    meter = TokenMeter(ScriptPolicy(chain_script(samples)), count=lambda text: 1)
    ctx = ctx_for(meter, greedy=meter)
    table = ChoiceTable(4, {"easy": {4: "greedy"}, "hard": {4: "majority"}})
    rows = solve([P("e", Q, "5"), P("h", Q, "5")], "auto", 4, ctx, meter=meter, grade=grade, choices=table)
    # e: the 4 probe chains all box 5 -> agreement 1 -> easy -> greedy; h: 5, 6, 7, 8 -> 1/4 -> hard -> majority
    assert [(r["difficulty"], r["chosen"], r["strategy"]) for r in rows] == [("easy", "greedy", "auto"),
                                                                            ("hard", "majority", "auto")]
    # tokens (1 per proposal, 2 per chain): e = 4 probe chains + 1 greedy chain = 10; h = 4 probe + 4 = 16
    assert [r["tokens"] for r in rows] == [10, 16]
    assert rows[1]["answer"] == "5"  # a 4-way tie: first seen


def test_chain_cache_samples_each_chain_once_and_still_charges_its_tokens():
    samples = {"p": [(5, None), (6, None), (5, None), (7, None)]}
    policy = ScriptPolicy(chain_script(samples))
    meter = TokenMeter(policy, count=lambda text: 1)
    ctx = ctx_for(meter, chain_cache={})
    two = solve([P("p", Q, "5")], "majority", 2, ctx, meter=meter, grade=grade)
    four = solve([P("p", Q, "5")], "majority", 4, ctx, meter=meter, grade=grade)
    bon = solve([P("p", Q, "5")], "best_of_n", 4, ctx_for(meter, TableScorer({}), chain_cache=ctx.chain_cache),
                meter=meter, grade=grade)
    # chains 0-1 drawn for budget 2, chains 2-3 added for budget 4, none for best_of_n: 4 chains x 2 proposals
    assert len(policy.asked) == 8
    # but each row is charged what its strategy spends: 2 or 4 chains of 2 one-token proposals
    assert [two[0]["tokens"], four[0]["tokens"], bon[0]["tokens"]] == [4, 8, 8]
    assert four[0]["answer"] == "5"  # 5, 6, 5, 7


def test_score_memo_scores_each_prefix_once():
    from rounds.strategies.base import ScoreMemo

    inner = TableScorer({"# The answer is \\boxed{5}": 0.9})
    memo = ScoreMemo(inner)
    ctx = ctx_for(ScriptPolicy(chain_script({"p": [(5, None), (5, None)]})), memo, chain_cache={})
    wm = solve([P("p", Q, "5")], "weighted_majority", 2, ctx, grade=grade)
    bon = solve([P("p", Q, "5")], "best_of_n", 2, ctx, grade=grade)
    # both chains render identically (same step, same output): one distinct full solution, scored once
    assert len(inner.scored) == 1 and wm[0]["answer"] == bon[0]["answer"] == "5"
