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


def _group_reference(query, prefix, prompts, slot_of, key, value, allowed):
    """sdpa over each row's [shared prefix | its prompt | own keys]."""
    pk, pv = prefix
    b, h, q, d = query.shape
    g = h // key.shape[1]
    outs = []
    for i in range(b):
        gk, gv = prompts[slot_of[i]]
        k = torch.cat([pk[0], gk, key[i]], 1).repeat_interleave(g, 0)[None]
        v = torch.cat([pv[0], gv, value[i]], 1).repeat_interleave(g, 0)[None]
        ok = torch.cat([torch.ones(1, 1, q, pk.shape[2] + gk.shape[1], dtype=torch.bool), allowed[i : i + 1]], -1)
        outs.append(F.scaled_dot_product_attention(query[i : i + 1], k, v, attn_mask=ok).transpose(1, 2))
    return torch.cat(outs)


def test_group_attention_equals_attention_over_prefix_prompt_and_rows_and_rows_stay_independent():
    """Rows reading their request's prompt once (kv_cache.GroupKV, two width buckets, 1-3 rows per prompt) attend
    as if each held [prefix | prompt | own tokens]; and a row's bits do not change with the other prompts held."""
    from pipeline.engines.kv_cache import GroupKV

    torch.manual_seed(0)
    kv_heads, h, d, p, s = 3, 9, 64, 7, 5
    # Buckets of width 64 (3 prompts) and 128 (1). Prompt 2 (29 tokens) padded to 40 columns instead of its bucket's
    # 64 decodes other bits than alone in 10 seeds of 10 (checked 2026-12-02): CPU flash attention's last bits move
    # with the padding, which is why GroupKV pads by the prompt's own length.
    lengths = [3, 60, 29, 70]
    prompts = [(torch.randn(kv_heads, n, d), torch.randn(kv_heads, n, d)) for n in lengths]
    rows_per = [2, 1, 3, 2]
    slot_of = [i for i, n in enumerate(rows_per) for _ in range(n)]
    b = len(slot_of)
    query = torch.randn(b, h, 1, d)
    key, value = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    prefix = (torch.randn(1, kv_heads, p, d), torch.randn(1, kv_heads, p, d))
    allowed = torch.ones(b, 1, 1, s, dtype=torch.bool)
    allowed[::2, :, :, :2] = False  # left padding in some rows' own caches
    module = types.SimpleNamespace(layer_idx=0)

    groups = GroupKV()
    slots = {}
    for i, (k, v) in enumerate(prompts):
        slots[i] = groups.acquire((i,), [(k[None], v[None])], rows_per[i])
    assert sorted(groups.buckets) == [64, 128]
    got, _ = cascade.attention(module, query, key, value, allowed, scaling=d ** -0.5, shared_prefix=[prefix],
                               group_prefix=groups.prefix([slots[i] for i in slot_of], "cpu"))
    torch.testing.assert_close(got, _group_reference(query, prefix, prompts, slot_of, key, value, allowed),
                               atol=2e-6, rtol=1e-5)

    # Prompt 2's rows (2 to 4) with its prompt held alone: the same bits.
    alone = GroupKV()
    slot = alone.acquire((2,), [(prompts[2][0][None], prompts[2][1][None])], 3)
    rows = slice(3, 6)
    solo, _ = cascade.attention(module, query[rows], key[rows], value[rows], allowed[rows], scaling=d ** -0.5,
                                shared_prefix=[prefix], group_prefix=alone.prefix([slot] * 3, "cpu"))
    assert torch.equal(solo, got[rows])
