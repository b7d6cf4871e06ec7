"""The embedded SmolLM2-135M through the transformers backend: one real prompt, one step in the format.

Cost: converting the GGUF once (~25 s, cached afterwards) plus ~10 s of CPU generation.
"""

from __future__ import annotations

import pytest

from mcts.protocols import SearchState
from mcts.steps import STOP_STRINGS, parse_step
from pipeline.engines import EngineConfig, GenerationConfig, make_policy


@pytest.mark.slow
def test_embedded_model_writes_a_step_in_the_format():
    cfg = EngineConfig(device="cpu", generation=GenerationConfig(temperature=0.0, max_new_tokens_step=64))
    policy = make_policy(cfg, mode="step", few_shot=True)
    state = SearchState("p1", "Tom has 3 apples and buys 5 more. How many apples does he have?", "", 0)
    [[proposal]] = policy.propose([state], 1)
    # Greedy, few-shot prompted: the model imitates the example - a comment, code, then the delimiter.
    assert proposal.stop in STOP_STRINGS, proposal
    step = parse_step(proposal.text)
    assert step.reasoning and step.code, step
