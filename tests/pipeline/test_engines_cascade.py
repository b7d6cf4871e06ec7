"""pipeline.engines.cascade: attention over [shared prefix | row's own cache] in two parts merged by log-sum-exp
equals softmax attention over the concatenation (sdpa), for decode and prefill, padding masks, grouped heads."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from pipeline.engines import cascade


def _reference(query, prefix, key, value, allowed):
    """sdpa over each row's [prefix | own keys], the prefix visible to every query."""
    pk, pv = prefix
    b, h, q, d = query.shape
    g = h // key.shape[1]
    k = torch.cat([pk.expand(b, -1, -1, -1), key], 2).repeat_interleave(g, 1)
    v = torch.cat([pv.expand(b, -1, -1, -1), value], 2).repeat_interleave(g, 1)
    full = torch.cat([torch.ones(b, 1, q, pk.shape[2], dtype=torch.bool), allowed], -1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=full).transpose(1, 2)


@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_merged_parts_equal_attention_over_prefix_and_rows(q, kv_heads):
    torch.manual_seed(0)
    b, h, d, p, s = 4, 3 * kv_heads, 16, 11, 9
    query = torch.randn(b, h, q, d)
    key, value = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    prefix = (torch.randn(1, kv_heads, p, d), torch.randn(1, kv_heads, p, d))
    module = types.SimpleNamespace(layer_idx=0)
    # Left padding of 0..3 columns per row, causal over the last q columns (a prefill of q new tokens).
    allowed = torch.ones(b, 1, q, s, dtype=torch.bool).tril(s - q)
    for row in range(b):
        allowed[row, :, :, :row] = False
    got, _ = cascade.attention(module, query, key, value, allowed, scaling=d ** -0.5, shared_prefix=[prefix])
    want = _reference(query, prefix, key, value, allowed)
    assert got.shape == (b, q, h, d)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if q > 1:  # no mask given (transformers skips it when nothing is padded): causal over the rows' own keys
        got, _ = cascade.attention(module, query, key, value, None, scaling=d ** -0.5, shared_prefix=[prefix])
        no_pad = torch.ones(b, 1, q, s, dtype=torch.bool).tril(s - q)
        torch.testing.assert_close(got, _reference(query, prefix, key, value, no_pad), atol=2e-6, rtol=1e-5)
    # A row's result does not depend on the others: row 2 alone gives the same bits.
    alone, _ = cascade.attention(module, query[2:3], key[2:3], value[2:3], allowed[2:3], scaling=d ** -0.5,
                                 shared_prefix=[prefix])
    full, _ = cascade.attention(module, query, key, value, allowed, scaling=d ** -0.5, shared_prefix=[prefix])
    assert torch.equal(alone, full[2:3])


def test_engine_logits_match_the_prefix_held_in_every_row(tiny, tok):
    """On tiny-random: the engine under cascade attention decodes what it decodes with the prefix in each row."""
    from mcts.protocols import SearchState
    from pipeline.engines import GenerationConfig, PromptBuilder
    from pipeline.engines.hf_policy import TransformersPolicy

    def policy(on: bool):
        return TransformersPolicy(tiny, PromptBuilder(tok, few_shot=False), GenerationConfig(
            temperature=0.0, max_new_tokens_step=12), "step", device="cpu", shared_prefix_attention=on)

    states = [SearchState(f"t{i}", f"What is {i} plus {'seven ' * i}{i * 3}?", "", i) for i in range(5)]
    on, off = policy(True), policy(False)
    assert on.propose(states, 1) == off.propose(states, 1)
    assert on.batch.shared is not None and off.batch.shared is None
    assert on.stats.prefill_tokens == off.stats.prefill_tokens  # the prefix once, then each prompt's own tokens
