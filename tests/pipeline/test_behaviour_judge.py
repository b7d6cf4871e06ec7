"""The LLM behaviour judge against a real HTTP server on 127.0.0.1 that answers chat requests like a model would,
from a script. It tests the judge's protocol and parsing (prompts, retries, <count>/<evidence>), not a model."""

from __future__ import annotations

import functools
import json
import socket

import pytest
from scripted_server import ScriptedServer

from data.generators.countdown import countdown_question
from mcts.behaviours import BEHAVIOURS, StepText
from mcts.node import ROOT_ID
from mcts.qvalues import backup
from mcts.serialize import tree_to_rows
from mcts.steps import parse_step
from mcts.tree import Tree, TreeInfo
from pipeline.behaviour_judge import BehaviourJudge, build_prompt, main, parse_reply
from pipeline.engines import EngineError, HttpConfig
from pipeline.storage import RunDir

QUESTION = countdown_question([8, 3, 5], 19)
STEPS = [
    StepText("# Add 8 and 3.\na = 8 + 3\nprint(a)", "11"),
    StepText("# 11 + 5 is 16, not 19. Try multiplying instead.\nb = 8 * 3 - 5\nprint(b)", "19"),
    StepText("# The answer is \\boxed{8 * 3 - 5}"),
]
# What the scripted model says to each category's prompt (recognised by the category's wording).
REPLIES = {
    "answer-verification": "The model compares 16 with the target.\n<count>1</count>\n"
                           "<evidence>11 + 5 is 16, not 19.</evidence>",
    "backtracking behavior": "It abandons addition. <count>1</count> <evidence>Try multiplying\n  instead.</evidence>",
    "subgoal setting": "No intermediate goals are stated. <count>0</count>",
    "backward-chaining": "I think there is none.",  # no <count>: a parse failure, not a transport one
}


def scripted(body: dict) -> tuple[int, dict]:
    prompt = body["messages"][0]["content"]
    for key, text in REPLIES.items():
        if f"contains any {key}" in prompt or f"contains any explicit {key}" in prompt:
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]}
    return 400, {"error": "unrecognised prompt"}


Server = functools.partial(ScriptedServer, route="/v1/chat/completions")  # a real HTTP server, scripted replies


def test_judge_sends_one_chat_request_per_behaviour_and_parses_counts_and_evidence():
    with Server(scripted) as srv:
        judge = BehaviourJudge(HttpConfig(endpoints=[srv.url]), model="judge-7b")
        verdicts = judge.judge(QUESTION, STEPS)
    assert [v.behaviour for v in verdicts] == list(BEHAVIOURS)
    assert srv.paths == ["/v1/chat/completions"] * 4
    for body in srv.bodies:
        assert (body["model"], body["temperature"], len(body["messages"])) == ("judge-7b", 0.0, 1)
        prompt = body["messages"][0]["content"]
        # Countdown framing with the question's numbers and target, the rendered steps with their outputs.
        assert "game of Countdown with the numbers [8, 3, 5]" in prompt and "target number 19" in prompt
        assert "# output: 11\n<end_of_step>" in prompt and "\\boxed{8 * 3 - 5}\n<end_of_answer>" in prompt
        assert "<count> </count>" in prompt and "<evidence> </evidence>" in prompt
    by = {v.behaviour: v for v in verdicts}
    assert (by["verification"].count, by["verification"].evidence) == (1, "11 + 5 is 16, not 19.")
    assert (by["backtracking"].count, by["backtracking"].evidence) == (1, "Try multiplying instead.")
    assert (by["subgoal_setting"].count, by["subgoal_setting"].evidence, by["subgoal_setting"].error) == (0, "", None)
    assert by["backward_chaining"].count is None and "no <count>N</count>" in by["backward_chaining"].error
    assert by["backward_chaining"].reply == "I think there is none."


def test_tags_are_counted_behaviours_located_at_their_step():
    with Server(scripted) as srv:
        tags = BehaviourJudge(HttpConfig(endpoints=[srv.url]), model="m").tags(QUESTION, STEPS)
    assert [(t.behaviour, t.step, t.rule) for t in tags] == [("verification", 1, "judge"), ("backtracking", 1, "judge")]


def test_a_5xx_is_retried_on_the_next_endpoint_and_a_4xx_is_raised_at_once():
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, {"error": "overloaded"}) if len(calls) == 1 else scripted(body)

    with Server(flaky) as srv:
        judge = BehaviourJudge(HttpConfig(endpoints=[srv.url], backoff_s=0.0), model="m")
        verdicts = judge.judge(QUESTION, STEPS, behaviours=("verification",))
    assert len(calls) == 2 and verdicts[0].count == 1

    with Server(lambda body: (400, {"error": "model 'm' does not exist"})) as srv:
        judge = BehaviourJudge(HttpConfig(endpoints=[srv.url], backoff_s=0.0, max_retries=3), model="m")
        with pytest.raises(EngineError, match=r"rejected the verification request with 400: .*does not exist"):
            judge.judge(QUESTION, STEPS, behaviours=("verification",))
        assert len(srv.bodies) == 1


def test_a_dead_server_fails_with_the_endpoint_and_attempts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    judge = BehaviourJudge(HttpConfig(endpoints=[url], backoff_s=0.0, max_retries=1, timeout_s=2), model="m")
    with pytest.raises(EngineError, match=r"failed 2 times; last error http://127\.0\.0\.1:\d+/v1/chat/completions"):
        judge.judge(QUESTION, STEPS, behaviours=("backtracking",))


def test_parse_reply_takes_the_last_count_and_the_math_framing_is_used_without_a_target():
    v = parse_reply("verification", "draft <count>3</count> ... final answer <count>2</count>")
    assert (v.count, v.error) == (2, None)
    prompt = build_prompt("subgoal_setting", "Sam has 9 books. How many books?", STEPS[:1])
    assert "while solving this problem: Sam has 9 books. How many books?" in prompt
    assert "Countdown" not in prompt and "get close to 50" in prompt


def test_cli_judges_a_rounds_graded_trajectories(tmp_path, capsys):
    t = Tree(TreeInfo("p1", QUESTION, "19", 1, "terminal", 1.0, 1))
    n1 = t.add_child(t.new_id(), ROOT_ID, parse_step(STEPS[0].text), "11", "open")
    n2 = t.add_child(t.new_id(), n1.id, parse_step(STEPS[1].text), "19", "open")
    leaf = t.add_child(t.new_id(), n2.id, parse_step(STEPS[2].text), "", "terminal", "correct")
    leaf.reward = 1.0
    backup(t.nodes, leaf.id, 1.0)
    run = RunDir(tmp_path / "run")
    with run.trees(1).writer(1) as w:
        w.append("p1", tree_to_rows(t))
    with Server(scripted) as srv:
        rc = main([str(run.root), "--round", "1", "--endpoint", srv.url, "--model", "m"])
    out, err = capsys.readouterr()
    assert rc == 0
    row = json.loads(out.splitlines()[0])
    assert (row["problem_id"], row["verdict"], row["judge"]) == ("p1", "correct", ["backtracking", "verification"])
    assert row["rules"] == ["backtracking", "verification"]  # "16, not 19" and "instead"
    assert "verification       judge and rules agree on 1/1 trajectories" in err
