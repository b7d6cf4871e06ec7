"""pipeline.engines.packed: bf16 linear layers packed once for oneDNN compute what torch's plain bf16 ``Linear``
computes, bit for bit, at every row count a decode step or prefill uses, and the engine on them samples the same
text."""

from __future__ import annotations

import pytest
import torch

from mcts.protocols import SearchState
from pipeline.engines import GenerationConfig, PromptBuilder, fastpath, packed

pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN without bf16 on this CPU: nothing is packed")


@pytest.fixture(scope="module")
def fp32_model():
    """Random weights in the embedded model's shapes (SmolLM2-135M: 576 wide, MLP 1536, 49152 tokens, tied
    lm_head), 2 layers: oneDNN picks its kernels by these shapes (tiny-random's are too small to tell)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_packed_model_gives_the_plain_bf16_models_logits_at_every_row_count(fp32_model):
    plain = fastpath.apply(fp32_model, "bf16", pack=False)
    fast = fastpath.apply(fp32_model, "bf16")
    linears = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    swapped = [m for m in fast.modules() if isinstance(m, packed.PackedLinear)]
    assert linears and len(swapped) == len(linears)  # every linear layer, the tied lm_head included
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert fastpath.linear_flops(fast) == fastpath.linear_flops(plain) == fastpath.linear_flops(fp32_model)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, length in ((1, 1), (3, 7), (33, 1), (64, 1), (2, 300)):
            ids = torch.randint(0, fp32_model.config.vocab_size, (rows, length), generator=gen)
            want, got = plain(input_ids=ids).logits, fast(input_ids=ids).logits
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, want), (rows, length)
    assert fp32_model.dtype == torch.float32  # the caller's model is not touched
    assert all(type(m) is torch.nn.Linear for m in fp32_model.modules() if isinstance(m, torch.nn.Linear))


def test_packing_refuses_a_weight_that_is_not_bf16():
    with pytest.raises(ValueError, match="bf16"):
        packed.PackedLinear(torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    assert packed.pack_linears(model) == 1  # only the bf16 layer
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], packed.PackedLinear)
    assert packed.pack_linears(model) == 0  # packed layers are not packed again


def test_engine_on_packed_layers_samples_what_it_samples_on_plain_ones(tiny, tok):
    from pipeline.engines.hf_policy import TransformersPolicy

    def policy(pack: bool):
        return TransformersPolicy(tiny, PromptBuilder(tok, few_shot=False),
                                  GenerationConfig(temperature=0.8, max_new_tokens_step=12), "step", device="cpu",
                                  cpu_fast_path="bf16", max_batch_rows=8, packed_linears=pack)

    states = [SearchState(f"p{i}", f"What is {i} + {2 * i}?", "", 10 + i) for i in range(3)]
    fast, plain = policy(True), policy(False)
    assert any(isinstance(m, packed.PackedLinear) for m in fast.model.modules())
    assert not any(isinstance(m, packed.PackedLinear) for m in plain.model.modules())
    want = [[p.text for p in props] for props in plain.propose(states, 3)]
    got = [[p.text for p in props] for props in fast.propose(states, 3)]
    assert got == want
