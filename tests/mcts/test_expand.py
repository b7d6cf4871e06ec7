from mcts.expand import COMMENT_ONLY, parse_proposal
from mcts.protocols import Proposal
from mcts.steps import ANSWER_END, BRACE_STOP, SOLUTION_STOP_STRINGS, STEP_END, STOP_STRINGS

SOLUTION = "# Tom has 3 apples.\na = 3\n# He buys 5 more.\nb = a + 5\nprint(b)\n# The answer is \\boxed{8}"


def test_one_step_proposal():
    chain = parse_proposal(Proposal("# a is 3\na = 3", STEP_END), room=4)
    assert [s.code for s in chain.steps] == ["a = 3"] and not chain.final and chain.rejected is None


def test_whole_solution_is_cut_into_a_final_chain():
    chain = parse_proposal(Proposal(SOLUTION, ANSWER_END), room=16)
    assert [s.code for s in chain.steps] == ["a = 3", "b = a + 5\nprint(b)", ""]
    assert chain.final and chain.steps[-1].answer == "8" and chain.rejected is None


def test_chain_cut_at_a_bad_step_keeps_the_rest_as_rejected():
    text = "# one\nx = 1\n<end_of_step>\nx = 2\n<end_of_step>\n# three\ny = 3"
    chain = parse_proposal(Proposal(text, None), room=16)
    assert [s.code for s in chain.steps] == ["x = 1"] and not chain.final
    assert chain.rejected.stage == "parse"
    assert chain.rejected.error == "no reasoning comment: a step starts with a '# ...' line (1 later step(s) dropped)"
    assert chain.rejected.text == "x = 2\n# three\ny = 3"


def test_prose_reasoning_without_hashes_is_kept_as_comments():
    text = "Tom has 3 apples.\na = 3\nprint(a)\nHe buys 5 more, so the answer is 8."
    chain = parse_proposal(Proposal(text, ANSWER_END), room=16)
    assert [s.text for s in chain.steps] == ["# Tom has 3 apples.\na = 3\nprint(a)",
                                             "# He buys 5 more, so the answer is 8."]
    assert chain.rejected is None and chain.final  # stopped at <end_of_answer>; no boxed answer -> graded None


def test_steps_after_the_answer_and_past_max_depth_are_dropped_and_recorded():
    text = "# a\nx = 1\n<end_of_step>\n# so \\boxed{1}\n<end_of_step>\n# more\nz = 3"
    chain = parse_proposal(Proposal(text, None), room=16)
    assert len(chain.steps) == 2 and chain.final  # a closed \boxed{} ends the solution even without a stop
    assert (chain.rejected.stage, chain.rejected.error) == ("after_answer", "1 step(s) after the final answer dropped")
    chain = parse_proposal(Proposal(SOLUTION, ANSWER_END), room=2)
    assert len(chain.steps) == 2 and not chain.final  # the answer step would be past max_depth
    assert (chain.rejected.stage, chain.rejected.error) == ("depth", "1 step(s) past max_depth dropped")


def test_finality_of_the_last_step():
    # Stopped at <end_of_answer> without \boxed{}: the model declared itself done -> final, answer None.
    chain = parse_proposal(Proposal("# I give up", ANSWER_END), room=3)
    assert chain.final and chain.steps[0].answer is None
    # Ran out of tokens without an answer: the steps are kept, none terminal.
    chain = parse_proposal(Proposal("# start\nx = 1\n# next\ny = x +", None), room=3)
    assert len(chain.steps) == 2 and not chain.final
    chain = parse_proposal(Proposal("", STEP_END), room=3)
    assert chain.steps == () and (chain.rejected.stage, chain.rejected.error) == ("parse", "empty proposal")


def test_a_comment_only_step_is_rejected_like_failing_code():
    # step mode: a step of prose only computes nothing
    chain = parse_proposal(Proposal("# Tom has 3 apples and buys 5 more.", STEP_END), room=4)
    assert chain.steps == () and not chain.final
    assert (chain.rejected.stage, chain.rejected.error) == ("exec", COMMENT_ONLY)
    # solution mode: the chain keeps the code steps before it and is cut there
    text = "# a\nx = 3\n<end_of_step>\n# now think about it\n<end_of_step>\n# y\ny = x + 5\n<end_of_step>\n# \\boxed{8}"
    chain = parse_proposal(Proposal(text, ANSWER_END), room=16)
    assert [s.code for s in chain.steps] == ["x = 3"] and not chain.final
    assert chain.rejected.error == COMMENT_ONLY + " (2 later step(s) dropped)"
    assert chain.rejected.text.startswith("# now think about it")


def test_the_final_step_may_be_comment_only_and_the_check_can_be_turned_off():
    chain = parse_proposal(Proposal(SOLUTION, ANSWER_END), room=16)  # its final step is '# The answer is ...'
    assert chain.final and chain.rejected is None and chain.steps[-1].code == ""
    # a proposal the model closed with <end_of_answer> and no answer is final (graded wrong), not rejected
    chain = parse_proposal(Proposal("# x\nx = 1\n<end_of_step>\n# I am done", ANSWER_END), room=16)
    assert chain.final and chain.rejected is None and len(chain.steps) == 2
    # require_code=False keeps prose-only steps (the old behaviour)
    chain = parse_proposal(Proposal("# Tom has 3 apples and buys 5 more.", STEP_END), room=4, require_code=False)
    assert len(chain.steps) == 1 and chain.rejected is None


def test_a_solution_stopped_after_its_boxed_answer_gets_the_brace_back():
    # the model wrote '...\\boxed{12}\n# The answer is \\boxed{12}...'; the engine stopped at the first '}\n'
    # and returned the text before it (pipeline.engines.common.cut_at_stop)
    text = "# 4 pens at 3 dollars\ncost = 4 * 3\nprint(cost)\n# The answer is \\boxed{12"
    chain = parse_proposal(Proposal(text, BRACE_STOP), room=16)
    assert chain.final and chain.steps[-1].answer == "12" and chain.rejected is None
    assert chain.steps[-1].text == "# The answer is \\boxed{12}"
    # a dict literal that closes a line ends the proposal there, intact, not final: the next expansion goes on
    chain = parse_proposal(Proposal("# prices\np = {\n  'pen': 3,\n", BRACE_STOP), room=16)
    assert [s.code for s in chain.steps] == ["p = {\n  'pen': 3,\n}"] and not chain.final and chain.rejected is None
    assert BRACE_STOP in SOLUTION_STOP_STRINGS and BRACE_STOP not in STOP_STRINGS  # step mode never stops there
