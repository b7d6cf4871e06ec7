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
    swapped = [m for m in fast.modules() if isinstance(m, packed.PackedLinear | packed.ProjectionSlice)]
    assert linears and len(swapped) == len(linears)  # every linear layer, the tied lm_head included
    fused = [m for m in fast.modules() if isinstance(m, packed.FusedQKV)]
    assert len(fused) == 2  # one q/k/v product a layer
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


def test_fused_qkv_gives_the_separately_packed_models_logits(fp32_model):
    """q, k and v in one product (up to PACK_ROWS rows) or three (above): the logits of the model packed without the
    joint product, bit for bit, at decode sizes and at prefill sizes where the joint product's own bits differ."""
    from unittest import mock

    fused = fastpath.apply(fp32_model, "bf16")
    with mock.patch.object(packed, "_fuse_qkv", return_value=0):
        separate = fastpath.apply(fp32_model, "bf16")
    assert not any(isinstance(m, packed.FusedQKV) for m in separate.modules())
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows, length in ((1, 1), (56, 1), (64, 1), (96, 1), (1, 300), (8, 120)):
            ids = torch.randint(0, fp32_model.config.vocab_size, (rows, length), generator=gen)
            assert torch.equal(fused(input_ids=ids).logits, separate(input_ids=ids).logits), (rows, length)


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


def test_fused_qkv_takes_k_and_v_from_the_product_of_the_same_input_only():
    """k_proj and v_proj reuse q_proj's joint product only for the very tensor q_proj was called with; another
    input is multiplied anew, and each slice equals the separate packed layer's output bit for bit."""
    torch.manual_seed(1)
    q, k, v = (torch.nn.Linear(64, n, bias=False).to(torch.bfloat16) for n in (64, 32, 32))
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = q, k, v
    alone = [packed.PackedLinear(x) for x in (q, k, v)]
    assert packed.pack_linears(attn) == 3
    assert isinstance(attn.q_proj, packed.FusedQKV) and isinstance(attn.v_proj, packed.ProjectionSlice)
    x, y = torch.randn(2, 5, 64).to(torch.bfloat16), torch.randn(2, 5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(y)]  # v on another input: computed for y
        assert attn.q_proj._x is None  # v let go of the stashed product
        want = [alone[0](x), alone[1](x), alone[2](y)]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and torch.equal(g, w)
        assert torch.equal(attn.k_proj(y), alone[1](y))  # no q call first: computed, not a stale x product
        # Above PACK_ROWS rows (here 300 tokens) the three separate products: the joint one's bits differ there.
        z = torch.randn(1, 300, 64).to(torch.bfloat16)
        for proj, one in zip((attn.q_proj, attn.k_proj, attn.v_proj), alone, strict=True):
            assert torch.equal(proj(z), one(z))
