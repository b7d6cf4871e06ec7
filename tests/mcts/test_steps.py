"""The step format: parsing, the canonical boxed answer, splitting whole solutions, stop strings."""

import pytest

from mcts.steps import (
    OUTPUT_STOP,
    SOLUTION_STOP_STRINGS,
    STOP_STRINGS,
    StepFormatError,
    parse_step,
    prose_to_comments,
    render_step,
    split_steps,
)


def test_parse_step_splits_reasoning_and_code():
    s = parse_step("# Tom buys 5 more.\napples = 3 + 5\nprint(apples)\n")
    assert s.reasoning == "Tom buys 5 more."
    assert s.code == "apples = 3 + 5\nprint(apples)"
    assert s.answer is None and not s.is_final


@pytest.mark.parametrize(
    "text, answer, last_line",
    [
        ("# The answer is \\boxed{8}", "8", "# The answer is \\boxed{8}"),
        ("# The answer is 12", "12", "# The answer is \\boxed{12}"),
        ("# so the answer is 15 - 9 = 6.", "6", "# The answer is \\boxed{6}"),
        ("# x\ny = 3\n# The final answer is: 1,200", "1200", "# The answer is \\boxed{1200}"),
        ("# The answer is 2/3", "2/3", "# The answer is \\boxed{2/3}"),
    ],
)
def test_final_answers_are_canonically_boxed(text, answer, last_line):
    s = parse_step(text)
    assert s.answer == answer and s.is_final
    assert s.text.splitlines()[-1] == last_line


@pytest.mark.parametrize("text", ["# The answer is twelve", "# The answer is x + 1", "# the answer is\nx = 1"])
def test_answer_phrase_without_a_plain_number_is_not_an_answer(text):
    assert parse_step(text).answer is None


@pytest.mark.parametrize("text, reason", [("", "empty step"), ("x = 1", "no reasoning comment"),
                                          ("# a\n\\boxed{3", "unclosed")])
def test_malformed_steps_are_rejected_with_a_reason(text, reason):
    with pytest.raises(StepFormatError, match=reason):
        parse_step(text)


def test_model_written_output_lines_are_dropped():
    s = parse_step("# add\nx = 2 + 2\nprint(x)\n# output: 5")
    assert "output" not in s.text


def test_split_whole_solution_at_comment_after_code():
    text = "# first\na = 1\n# second\n# still second\nb = a + 1\n# The answer is \\boxed{2}"
    assert split_steps(text) == ["# first\na = 1", "# second\n# still second\nb = a + 1",
                                 "# The answer is \\boxed{2}"]


def test_split_at_delimiters_when_present():
    assert split_steps("# a\nx=1\n<end_of_step>\n# b\n<end_of_answer>") == ["# a\nx=1", "# b"]


def test_output_stop_ends_both_modes():
    # The model starting its own '# output:' line is where it needs the real value: both modes stop there.
    assert OUTPUT_STOP in STOP_STRINGS and OUTPUT_STOP in SOLUTION_STOP_STRINGS
    assert "<end_of_step>" not in SOLUTION_STOP_STRINGS


def test_render_step_shows_output_and_delimiter():
    assert render_step("# a\nprint(8)", "8\n") == "# a\nprint(8)\n# output: 8\n<end_of_step>\n"
    assert render_step("# The answer is \\boxed{8}", "", final=True) == "# The answer is \\boxed{8}\n<end_of_answer>\n"


# -- prose written without '#' ----------------------------------------------------------------------


def test_prose_lines_that_break_the_code_become_comments():
    text = ("Maya has 123 - 122 = 1 card left.\n1. Then she finds 2 more.\nx = 1 + 2\nprint(x)\n"
            "So, she has 3 cards.\nThe answer is 3.")
    assert prose_to_comments(text) == ("# Maya has 123 - 122 = 1 card left.\n# 1. Then she finds 2 more.\n"
                                       "x = 1 + 2\nprint(x)\n# So, she has 3 cards.\n# The answer is 3.")
    assert parse_step(prose_to_comments(text)).answer == "3"  # and the answer phrase is then boxed


@pytest.mark.parametrize("text", [
    "# fine\nx = 1\nprint(x)",  # compiles: unchanged
    "# broken code stays code\nprint(number of stickers)\nThe rest is prose",  # stops at the code error
    "# a block header alone\nfor i in range(3):",  # a keyword line is code, never prose
    "# the first word is a name, the second code\nx = (1 +",
])
def test_code_and_broken_code_are_left_for_the_sandbox(text):
    assert prose_to_comments(text) == text


def test_prose_rewriting_keeps_delimiters_and_comments_in_place():
    text = "Tom has 3.\na = 3\n<end_of_step>\n# He buys 5.\nb = a + 5\n<end_of_answer>"
    assert prose_to_comments(text) == "# Tom has 3.\na = 3\n<end_of_step>\n# He buys 5.\nb = a + 5\n<end_of_answer>"
