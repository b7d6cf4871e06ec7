"""The HTTP policy against local OpenAI-compatible servers started here (http.server on 127.0.0.1).

One server really generates: it wraps the transformers backend on tiny-random, so the request the HTTP
policy sends (templated prompt, n, stop, seed) is what a `vllm serve` would receive. The others are
scripted to fail in the ways retries must handle: 5xx, a closed port, a 4xx.
"""

from __future__ import annotations

import functools
import socket

import pytest
from scripted_server import ScriptedServer

from mcts.protocols import Proposal, SearchState
from mcts.steps import ANSWER_END, BRACE_STOP, OUTPUT_STOP, STEP_END
from pipeline.engines import EngineError, GenerationConfig, HttpConfig, PromptBuilder
from pipeline.engines.http_policy import HttpPolicy, completions_url
from rounds.models import load_tokenizer, resolve_model

State = SearchState("t1", "What is 2 plus 3?", "", 42)


Server = functools.partial(ScriptedServer, route="/v1/completions")  # a real HTTP server, scripted replies


def _scripted(text: str = "# two and three\nprint(2 + 3)\n", stop: str | None = STEP_END):
    def reply(body):
        choices = [{"index": i, "text": text, "finish_reason": "stop", "stop_reason": stop} for i in range(body["n"])]
        return 200, {"choices": choices}

    return reply


def _free_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(load_tokenizer(resolve_model("tiny-random")))


def _policy(builder, endpoints, mode="step", **http):
    cfg = HttpConfig(endpoints=endpoints, backoff_s=0.01, timeout_s=5.0, **http)
    return HttpPolicy(cfg, "tiny", builder, GenerationConfig(max_new_tokens_step=16), mode)


def test_urls_accept_base_or_v1():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"


def test_request_carries_prompt_n_stop_seed(builder):
    with Server(_scripted()) as srv:
        got = _policy(builder, [srv.url]).propose([State], 3)
    assert got == [[Proposal("# two and three\nprint(2 + 3)\n", STEP_END)] * 3]
    body = srv.bodies[0]
    assert body["prompt"] == builder.build(State.question, State.history)
    assert (body["n"], body["seed"], body["max_tokens"], body["model"]) == (3, 42, 16, "tiny")
    assert body["stop"] == [STEP_END, ANSWER_END, OUTPUT_STOP]


def test_solution_mode_runs_past_step_ends(builder):
    with Server(_scripted(stop=ANSWER_END)) as srv:
        _policy(builder, [srv.url], mode="solution").propose([State], 1)
    assert srv.bodies[0]["stop"] == [ANSWER_END, OUTPUT_STOP, BRACE_STOP]  # BRACE_STOP: after \boxed{N}


def test_round_robin_over_endpoints(builder):
    with Server(_scripted()) as a, Server(_scripted()) as b:
        states = [SearchState(f"t{i}", f"q{i}", "", i) for i in range(4)]
        got = _policy(builder, [a.url, b.url], concurrency=1).propose(states, 1)
    assert len(got) == 4 and (len(a.bodies), len(b.bodies)) == (2, 2)


def test_retries_5xx_and_dead_endpoint_then_succeeds(builder):
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        return (503, {"error": "loading"}) if calls["n"] == 1 else _scripted()(body)

    with Server(flaky) as srv:
        # Round-robin alternates endpoints: dead port (refused), 503, dead port again, success.
        got = _policy(builder, [_free_port_url(), srv.url], concurrency=1).propose([State], 1)
    assert got[0][0].stop == STEP_END and calls["n"] == 2


def test_gives_up_after_the_last_retry_with_a_clear_error(builder):
    with Server(lambda body: (500, {"error": "boom"})) as srv:
        with pytest.raises(EngineError, match=r"failed 3 times; last error .*HTTP 500.*boom"):
            _policy(builder, [srv.url], max_retries=2).propose([State], 1)
    assert len(srv.bodies) == 3


def test_4xx_is_not_retried(builder):
    with Server(lambda body: (400, {"error": "model 'tiny' does not exist"})) as srv:
        with pytest.raises(EngineError, match="rejected the request for tree t1 with 400.*does not exist"):
            _policy(builder, [srv.url]).propose([State], 1)
    assert len(srv.bodies) == 1


def test_wrong_sample_count_is_an_error(builder):
    with Server(lambda body: (200, {"choices": [{"index": 0, "text": "x", "stop_reason": None}]})) as srv:
        with pytest.raises(EngineError, match="n=2 samples .* got 1"):
            _policy(builder, [srv.url]).propose([State], 2)


def test_against_a_server_that_runs_the_tiny_model(builder):
    from pipeline.engines.hf_policy import TransformersPolicy

    engine = TransformersPolicy(
        resolve_model("tiny-random"), builder, GenerationConfig(max_new_tokens_step=16), "step", device="cpu"
    )

    def serve(body):
        engine.gen = GenerationConfig(
            temperature=body["temperature"], top_p=body["top_p"], max_new_tokens_step=body["max_tokens"]
        )
        props = engine.generate([body["prompt"]], [body["seed"]], body["n"])[0]
        return 200, {
            "choices": [
                {"index": i, "text": p.text, "finish_reason": "stop" if p.stop else "length", "stop_reason": p.stop}
                for i, p in enumerate(props)
            ]
        }

    with Server(serve) as srv:
        pol = _policy(builder, [srv.url])
        remote = pol.propose([State, SearchState("t2", "What is 7 minus 4?", "", 7)], 2)
    local = engine.propose([State, SearchState("t2", "What is 7 minus 4?", "", 7)], 2)
    assert remote == local and all(len(p.text) > 0 for row in remote for p in row)
