"""pipeline.engines: continuous batching, the tree prefix store and the CPU fast paths, on tiny-random.

The model is ``tiny-random`` (random weights: varied text), so equal outputs mean equal computations,
not a model that always says the same thing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from mcts.protocols import SearchState
from pipeline.engines import EngineConfig, GenerationConfig, PromptBuilder
from pipeline.engines.kv_cache import PrefixStore

SAMPLE = GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens_step=10)


def _policy(path: Path, tok, **kw):
    from pipeline.engines.hf_policy import TransformersPolicy

    gen = kw.pop("gen", SAMPLE)
    return TransformersPolicy(path, PromptBuilder(tok, few_shot=False), gen, "step", device="cpu", **kw)


def _states(n: int, offset: int = 0) -> list[SearchState]:
    # Questions of different lengths, so rows join the batch with different paddings.
    return [SearchState(f"t{i}", f"What is {i} plus {'seven ' * (i % 4)}{i * 3}?", "", 100 + i)
            for i in range(offset, offset + n)]


# -- continuous batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", [False, True], ids=["rows", "group"])
def test_refilled_batch_gives_each_request_what_its_seed_gives_alone(tiny, tok, group):
    # 6 prompts x 2 samples = 12 rows through a 4-row batch: rows finish at different lengths and queued
    # requests take their slots while others are still decoding. Under group attention the rows read their
    # prompts from GroupKV slots that come and go with them.
    pol = _policy(tiny, tok, max_batch_rows=4, group_attention=group)
    states = _states(6)
    together = pol.propose(states, 2)
    assert pol.batch.peak_rows <= 4, pol.batch.peak_rows
    assert pol.batch.peak_slots == (2 if group else 0)
    alone = _policy(tiny, tok, max_batch_rows=4, group_attention=group)
    for s, got in zip(states, together, strict=True):
        assert alone.propose([s], 2) == [got], f"{s.tree_id}: batched {got} vs alone"


def test_finished_slots_are_refilled_and_every_request_matches_its_run_alone(tiny, tok):
    from pipeline.engines.batcher import Request

    # Budgets 2..9 tokens: rows finish at different ticks, and a 4-row batch refills a slot as soon as one
    # frees (k=1 requests fit any free slot).
    pol = _policy(tiny, tok, max_batch_rows=4)
    ids = [tok(pol.builder.build(s.question))["input_ids"] for s in _states(8)]

    def requests():
        return [Request(ids[i], [1000 + i], 2 + i, 1.0, 0.9) for i in range(8)]

    together = requests()
    with torch.inference_mode():
        pol._prefix()
        pol.batch.run(together)
    assert pol.batch.joins >= 4, f"only {pol.batch.joins} refills: the batch ran in static chunks"
    assert pol.batch.joins_copied < pol.batch.joins, "every refill copied the running rows instead of joining in place"
    assert pol.batch.peak_rows == 4
    for i, req in enumerate(requests()):
        with torch.inference_mode():
            pol.batch.run([req])
        assert req.tokens == together[i].tokens, f"request {i}: alone {req.tokens} vs batched {together[i].tokens}"
        assert len(req.tokens[0]) <= 2 + i


@pytest.mark.parametrize("group", [False, True], ids=["rows", "group"])
def test_concurrent_callers_share_one_batch_and_keep_their_samples(tiny, tok, group):
    pol = _policy(tiny, tok, max_batch_rows=16, group_attention=group)
    groups = [_states(2, 0), _states(3, 2), _states(2, 5)]
    results: dict[int, list] = {}

    def call(g: int) -> None:
        results[g] = pol.propose(groups[g], 3)

    threads = [threading.Thread(target=call, args=(g,)) for g in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = _policy(tiny, tok, max_batch_rows=16, group_attention=group)
    for g, states in enumerate(groups):
        assert results[g] == [alone.propose([s], 3)[0] for s in states], f"group {g}"
    assert pol.stats.calls == 3 and pol.batch.peak_rows <= 16


def test_the_batch_clock_counts_rows_per_step_and_time_per_part(tiny, tok):
    from pipeline.actors import BATCH_PARTS, PolicyEngine

    engine = PolicyEngine(lambda: _policy(tiny, tok, max_batch_rows=4))
    engine.propose(_states(3), 2)  # 6 rows through 4 slots
    st, gen = engine.stats(), engine.backend.stats
    # every decode step ran 1..4 rows; each sampled row is one new token
    assert 0 < gen.decode_ticks <= gen.new_tokens <= 4 * (gen.decode_ticks + 1), gen
    assert st.decode_ticks == gen.decode_ticks and set(st.parts_s) == set(BATCH_PARTS), st
    assert all(v > 0 for v in st.parts_s.values()), st.parts_s
    # the parts are disjoint stretches of the calls' time (the shared prefix's forward is outside them)
    assert sum(st.parts_s.values()) <= gen.seconds, (st.parts_s, gen.seconds)


def test_a_failing_tick_fails_the_requests_and_the_batch_recovers(tiny, tok):
    pol = _policy(tiny, tok, max_batch_rows=8)
    class Broken:  # the next tick's forward fails
        config = pol.model.config

        def __call__(self, **kwargs):
            raise RuntimeError("forward failed")

    pol.batch.model = Broken()
    with pytest.raises(RuntimeError, match="forward failed"):
        pol.propose(_states(1), 2)
    assert pol.batch.rows == 0
    pol.batch.model = pol.model
    assert pol.propose(_states(1), 2) == _policy(tiny, tok).propose(_states(1), 2)


def _perturb_forwards(model, calls: int):
    """Make the model's next ``calls`` forwards with a cache (the shared prefix's come first; a fused tick's forward
    has none) write other keys into it (each a different amount)."""
    from transformers import DynamicCache

    seen = []

    def hook(module, args, kwargs, output):
        cache = next((v for v in kwargs.values() if isinstance(v, DynamicCache)), None)
        if cache is not None and len(seen) < calls:
            seen.append(1)
            cache.layers[0].keys.add_(1e-3 * len(seen))
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_the_shared_prefix_kv_is_the_one_two_identical_forwards_agree_on(tiny, tok, capsys):
    clean = _policy(tiny, tok)
    clean.propose(_states(1), 2)
    pol = _policy(tiny, tok)
    handle = _perturb_forwards(pol.model, 1)  # the prefix's first forward goes wrong, as seen in a Ray actor
    try:
        got = pol.propose(_states(1), 2)
    finally:
        handle.remove()
    assert pol.prefix_disagreements == 1 and clean.prefix_disagreements == 0
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(pol.batch.shared, clean.batch.shared, strict=True))
    assert got == clean.propose(_states(1), 2)
    assert "differed between identical forwards" in capsys.readouterr().err


def test_a_prefix_kv_that_never_repeats_is_used_with_a_warning(tiny, tok, capsys):
    pol = _policy(tiny, tok)
    handle = _perturb_forwards(pol.model, 10)
    try:
        pol.propose(_states(1), 2)  # the run goes on
    finally:
        handle.remove()
    assert pol.prefix_disagreements == 3
    assert "differed in each of 4 identical forwards" in capsys.readouterr().err


# -- shared histories ---------------------------------------------------------------------------------


def test_children_reuse_the_parents_prompt_kv_and_get_the_same_text(tiny, tok):
    pol = _policy(tiny, tok)
    plain = _policy(tiny, tok, share_prefix=False)
    root = SearchState("a", "What is 12 times 7?", "", 5)
    pol.propose([root], 2)
    before = pol.stats.reused_tokens
    child = SearchState("a", root.question, "# 12 times 7\nx = 12 * 7\nprint(x)\n# output: 84\n<end_of_step>\n", 6)
    got = pol.propose([child], 2)
    root_len = len(tok(pol.builder.build(root.question))["input_ids"])
    # The child's prompt starts with the root's whole prompt, stored when the root was prefilled.
    assert pol.stats.reused_tokens - before == root_len, (pol.stats.reused_tokens, before, root_len)
    assert got == plain.propose([child], 2), "reused KV must give the same text as a full prefill"
    assert plain.stats.reused_tokens == 0 and len(plain.store) == 0
    # A re-visit of the same node reuses all but its last token.
    before = pol.stats.reused_tokens
    assert pol.propose([child], 2) == got
    child_len = len(tok(pol.builder.build(child.question, child.history))["input_ids"])
    assert pol.stats.reused_tokens - before == child_len - 1
    # Prompt tokens count each request's whole prompt; the hit rate is the cached share of them.
    assert pol.stats.prompt_tokens == root_len + 2 * child_len
    assert pol.stats.prefix_hit_rate == pytest.approx(pol.stats.reused_tokens / pol.stats.prompt_tokens)
    assert plain.stats.prompt_tokens == child_len and plain.stats.prefix_hit_rate == 0.0


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # [batch 1, 1 head, n positions, head_dim 2] float32: 8n bytes per tensor, 16n per layer, 32n for 2 layers.
    return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2)) for _ in range(layers)]


def test_finished_rows_leave_the_cache_in_place_and_the_others_keep_their_keys_and_values():
    from transformers import LlamaConfig

    from pipeline.engines.kv_cache import cache_of, compact_rows

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=8)
    rows = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1)
    kv = [(rows + torch.zeros(5, 1, 3, 4) + 10 * li, -rows + torch.zeros(5, 1, 3, 4)) for li in range(2)]
    cache = cache_of(config, kv, spare=8)
    before = [layer._k.data_ptr() for layer in cache.layers]
    order = compact_rows(cache, [0, 2, 4])
    assert order == [0, 4, 2], "row 4 moves into row 1's slot; rows 0 and 2 stay"
    for li, layer in enumerate(cache.layers):
        assert layer.keys.shape == (3, 1, 3, 4)
        assert torch.equal(layer.keys[:, 0, 0, 0], torch.tensor([0.0, 4.0, 2.0]) + 10 * li)
        assert torch.equal(layer.values[:, 0, 0, 0], -torch.tensor([0.0, 4.0, 2.0]))
    assert [layer._k.data_ptr() for layer in cache.layers] == before, "the cache was copied, not compacted in place"
    # Decoding goes on for the 3 rows: one more position each, written into their slots.
    k, v = cache.layers[0].update(torch.full((3, 1, 1, 4), 7.0), torch.full((3, 1, 1, 4), 7.0))
    assert k.shape == (3, 1, 4, 4) and torch.equal(k[:, 0, 3, 0], torch.full((3,), 7.0))
    assert compact_rows(cache, []) == [] and cache.layers[0].keys.shape[0] == 0


def _left_padded(config, widths: list[int], width: int, base: float):
    """A cache of rows whose last ``widths[i]`` of ``width`` columns hold keys ``base + row + column / 100``
    (values: their negatives) and whose mask marks them; the rest is padding."""
    from pipeline.engines.kv_cache import cache_of

    keys = torch.zeros(len(widths), 1, width, 4)
    mask = torch.zeros(len(widths), width, dtype=torch.long)
    for i, w in enumerate(widths):
        keys[i, :, width - w :] = base + i + torch.arange(w, dtype=torch.float32).view(1, w, 1) / 100
        mask[i, width - w :] = 1
    return cache_of(config, [(keys, -keys), (keys + 1, -keys - 1)], spare=8), mask


def _rows(cache, mask) -> list[list[float]]:
    """Each row's unmasked keys of layer 0 (first element of each column), in column order."""
    keys = cache.layers[0].keys[:, 0, :, 0]
    assert keys.shape == mask.shape
    return [keys[i][mask[i].bool()].tolist() for i in range(mask.shape[0])]


def test_joins_go_in_place_into_free_slots_and_headroom_and_keep_every_row():
    from transformers import LlamaConfig

    from pipeline.engines.kv_cache import JOIN_HEADROOM, compact_rows, join_left_padded

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=8)
    a, mask_a = _left_padded(config, [3, 5], 6, 0.0)  # 1 all-padding column
    b, mask_b = _left_padded(config, [2], 4, 10.0)
    want = _rows(a, mask_a) + _rows(b, mask_b)
    run, mask = join_left_padded(config, a, mask_a, b, mask_b, slots=8)  # a has no free slot: copied, with room
    assert run is not a and mask.shape == (3, 5) and _rows(run, mask) == want
    assert run.layers[0].slots == 8 and run.layers[0].headroom == JOIN_HEADROOM
    buffers = [layer._k.data_ptr() for layer in run.layers]
    # Narrower rows: into free slots, no copy of the running rows.
    c, mask_c = _left_padded(config, [1, 4], 4, 20.0)
    want += _rows(c, mask_c)
    run2, mask = join_left_padded(config, run, mask, c, mask_c, slots=8)
    assert run2 is run and mask.shape == (5, 5) and _rows(run, mask) == want
    # A wider row: the running rows gain columns from the headroom, still in place.
    d, mask_d = _left_padded(config, [9], 9, 30.0)
    want += _rows(d, mask_d)
    run3, mask = join_left_padded(config, run, mask, d, mask_d, slots=8)
    assert run3 is run and mask.shape == (6, 9) and _rows(run, mask) == want
    assert run.layers[0].headroom == JOIN_HEADROOM - 4
    assert torch.allclose(run.layers[1].keys[:, 0, :, 0][mask.bool()] - 1, run.layers[0].keys[:, 0, :, 0][mask.bool()])
    assert torch.equal(run.layers[0].values, -run.layers[0].keys)
    assert not run.layers[0].keys[:, 0][~mask.bool()].any(), "padding columns hold zeros"
    assert [layer._k.data_ptr() for layer in run.layers] == buffers
    # The wide row finishes: its columns become padding everywhere and the next join trims them, no copy.
    order = compact_rows(run, [0, 1, 2, 3, 4])
    mask, want = mask[order], [want[i] for i in order]
    e, mask_e = _left_padded(config, [2], 2, 40.0)
    want += _rows(e, mask_e)
    run4, mask = join_left_padded(config, run, mask, e, mask_e, slots=8)
    assert run4 is run and mask.shape == (6, 5) and _rows(run, mask) == want
    assert run.layers[0].get_seq_length() == 5 and [layer._k.data_ptr() for layer in run.layers] == buffers
    # Decoding goes on: every row gets its next column, in its own slot.
    for layer in run.layers:
        k, _ = layer.update(torch.full((6, 1, 1, 4), 7.0), torch.full((6, 1, 1, 4), 7.0))
        assert k.shape == (6, 1, 6, 4) and torch.equal(k[:, 0, 5, 0], torch.full((6,), 7.0))
    # More rows than free slots: copied again.
    f, mask_f = _left_padded(config, [1, 1, 1], 1, 50.0)
    run5, mask5 = join_left_padded(config, run, torch.cat([mask, mask.new_ones(6, 1)], 1), f, mask_f, slots=8)
    assert run5 is not run and mask5.shape == (9, 6) and run5.layers[0].slots == 9
    # A batch that runs for long, its oldest columns trimmed as rows come and go: the buffer does not grow with it.
    layer = run5.layers[0]
    for _ in range(500):
        layer.update(torch.ones(9, 1, 1, 4), torch.ones(9, 1, 1, 4))
        layer.trim(1)
    assert layer.get_seq_length() == 6 and layer._k.shape[2] <= 4 * (JOIN_HEADROOM + 6 + 1)


def test_prefix_store_stays_within_its_memory_bound_and_evicts_least_recent():
    store = PrefixStore(max_bytes=32 * 25)  # room for 25 positions at 32 bytes each
    assert store.add([1, 2, 3, 4, 5], _kv(5), pinned=True)  # 160 bytes, never evicted
    assert store.add([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], _kv(10))  # 320 -> 480
    assert store.add([7] * 10, _kv(10))  # 320 -> 800 = the bound exactly
    assert store.bytes == 800
    assert store.longest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 11)[0] == 10  # touches the [1..10] entry
    assert store.add([8] * 5, _kv(5))  # 160 more: evicts the least recent unpinned entry, [7]*10
    assert store.bytes == 800 - 320 + 160 and store.evictions == 1
    assert store.longest([7] * 12, 12) == (0, None)
    assert store.longest([1, 2, 3, 4, 5, 9], 6)[0] == 5  # the pinned prefix is still there
    assert not store.add([9] * 21, _kv(21)), "672 bytes + 160 pinned > 800: cannot fit, not stored"
    assert store.bytes <= store.max_bytes
    for i in range(40):  # churn: the bound holds throughout
        store.add([20 + i] * (1 + i % 7), _kv(1 + i % 7))
        assert store.bytes <= store.max_bytes, (i, store.bytes)
    assert store.longest([1, 2, 3, 4, 5], 5)[0] == 5


def test_prefix_store_extensions_serve_their_shared_head_and_go_with_their_entry():
    store = PrefixStore(max_bytes=32 * 25)
    assert store.add([1, 2, 3], _kv(3), pinned=True)
    assert not store.extend([1, 2, 3], [4], _kv(1)), "pinned entries take no extensions"
    assert not store.extend([9, 9], [4], _kv(1)), "nor prompts that are not stored"
    assert store.add([5, 6], _kv(2))
    tail = [(torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 2).clone(),) * 2 for _ in range(2)]
    assert store.extend([5, 6], [7, 8, 9, 10], tail)  # 128 bytes
    assert store.extension_bytes == 128 and store.bytes == 32 * (3 + 2 + 4)
    # A prompt sharing the entry and the first 2 tail tokens gets 4 positions: the entry's 2, then tail columns 0-1.
    n, kv = store.longest([5, 6, 7, 8, 11, 12], 6)
    assert n == 4 and kv[0][0].shape == (1, 1, 4, 2) and kv[0][0][0, 0, 2:, 0].tolist() == [0.0, 1.0]
    assert store.extension_tokens == 2
    assert store.longest([5, 6, 7, 8, 9], 4)[0] == 4, "the limit bounds what the tail adds"
    assert store.longest([5, 6, 3], 3)[0] == 2, "no shared tail token: the entry alone"
    # Evicting the entry frees its extensions with it.
    assert store.add([20] * 17, _kv(17))  # 544 bytes: 288 + 544 > 800, so [5, 6] and its tail go
    assert store.evictions == 1 and store.extension_bytes == 0 and store.bytes == 32 * (3 + 17)
    assert store.longest([5, 6, 7], 3) == (0, None)


def test_a_childs_prompt_reuses_the_kv_its_parent_sample_decoded(tiny, tok):
    from mcts.steps import render_step

    greedy = GenerationConfig(temperature=0.0, max_new_tokens_step=12)
    pol = _policy(tiny, tok, gen=greedy)
    parent = _states(1)[0]
    step = pol.propose([parent], 1)[0][0]
    child = SearchState("c", parent.question, render_step(step.text, "42"), 7)
    before = pol.stats.prefill_tokens
    got = pol.propose([child], 1)
    assert pol.store.extension_tokens > 0, "the child's prompt did not reuse its parent's decoded tokens"
    fresh = _policy(tiny, tok, gen=greedy)
    assert fresh.propose([child], 1) == got, "decode-time KV of the step gave other text than prefilling it"
    fresh_child_prefill = fresh.stats.prefill_tokens - len(fresh._prefix_ids)
    assert pol.stats.prefill_tokens - before < fresh_child_prefill


def test_engine_prefix_store_respects_its_bound(tiny, tok):
    pol = _policy(tiny, tok)
    pol.propose(_states(1), 1)
    c = pol.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4  # layers x (k, v) x fp32 bytes
    prompt = len(tok(pol.builder.build(_states(1)[0].question))["input_ids"])
    # Cascade attention (on by default on CPU): the shared prefix's KV is held once by the batch, and the store
    # keeps what follows it. Without it, the pinned prefix and the whole prompt are stored. Either way, with the
    # prompt's entry, the KV of the tokens its sample decoded (all but its last, unless it wrote EOS).
    assert pol.batch.shared is not None
    sampled = pol.store.extension_bytes
    assert sampled % per_token == 0 and sampled // per_token < pol.gen.max_new_tokens("step")
    assert pol.store.bytes == per_token * (prompt - len(pol._prefix_ids)) + sampled
    plain = _policy(tiny, tok, shared_prefix_attention=False)
    plain.propose(_states(1), 1)
    assert plain.batch.shared is None
    assert plain.store.bytes == per_token * (len(plain._prefix_ids) + prompt) + plain.store.extension_bytes
    pol.store.max_bytes = pol.store.bytes + 3 * (prompt - len(pol._prefix_ids)) * per_token  # ~3 more prompts
    pol.propose(_states(12, 1), 1)
    assert pol.store.bytes <= pol.store.max_bytes and pol.store.evictions > 0, (pol.store.bytes, pol.store.evictions)
    assert pol.store.longest(pol._prefix_ids, len(pol._prefix_ids))[0] == len(pol._prefix_ids), "pinned prefix kept"


# -- group attention ---------------------------------------------------------------------------------------


def _prompt_kv(n: int, fill: float) -> list:
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill)) for _ in range(2)]


def test_group_kv_shares_a_prompt_buckets_by_width_and_moves_the_last_slot_into_a_freed_one():
    from pipeline.engines.kv_cache import GroupKV

    groups = GroupKV(step=8)
    a = groups.acquire((1,), _prompt_kv(5, 1.0), 2)
    assert groups.acquire((1,), _prompt_kv(5, 9.0), 3) == a, "a running prompt is held once"
    b = groups.acquire((2,), _prompt_kv(7, 2.0), 1)
    c = groups.acquire((3,), _prompt_kv(8, 3.0), 1)
    d = groups.acquire((4,), _prompt_kv(12, 4.0), 1)
    assert (a, b, c, d) == ((8, 0), (8, 1), (8, 2), (16, 0)) and len(groups) == 4
    keys = groups.buckets[8].k[0]
    assert keys[0, :, 3:].eq(1.0).all() and keys[0, :, :3].eq(0).all(), "right aligned, zeros on the left"
    layers, mask = groups.buckets[8].view()
    assert layers[0][0].shape == (3, 2, 8, 4)
    assert mask[:, 0, 0].isinf().sum(-1).tolist() == [3, 1, 0]
    for _ in range(4):
        assert groups.release(a) is None, "rows still read it"
    assert groups.release(a) == c, "freed: the bucket's last slot (prompt 3) moved into it"
    assert groups.buckets[8].k[0][0, :, :].eq(3.0).all() and groups.rows == {(8, 0): 1, (8, 1): 1, (16, 0): 1}
    assert groups.acquire((3,), _prompt_kv(8, 0.0), 1) == (8, 0), "prompt 3 is found at its new slot"
    assert groups.release(d) is None and 16 not in groups.buckets, "an empty bucket goes"
    # Query places: bucket 8 holds slots 0 (2 rows) and 1 (1 row) -> 2 places each; row 2's place is 2.
    prefix = groups.prefix([(8, 0), (8, 1), (8, 0)], "cpu")
    (part,) = prefix.parts
    assert part.kmax == 2 and part.gather.tolist() == [0, 2, 1, 1] and prefix.scatter.tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="a slot without rows"):
        groups.prefix([(8, 0)], "cpu")


def test_group_attention_decodes_what_rows_holding_their_prompts_decode(tiny, tok):
    """Rows attending to one copy of their request's prompt: the same greedy text as rows that each hold it, over
    prompts with histories of different lengths (several width buckets), k = 3, in a batch refilled as rows end."""
    from mcts.steps import render_steps

    greedy = GenerationConfig(temperature=0.0, max_new_tokens_step=10)
    states = [SearchState(s.tree_id, s.question, render_steps([(f"x = {i}\nprint(x)", str(i), False)] * (i % 4)),
                          s.seed) for i, s in enumerate(_states(8))]
    on = _policy(tiny, tok, gen=greedy, max_batch_rows=12, group_attention=True)
    off = _policy(tiny, tok, gen=greedy, max_batch_rows=12)
    assert on.propose(states, 3) == off.propose(states, 3)
    assert on.batch.grouped and not off.batch.grouped
    assert on.batch.peak_slots == 4 and off.batch.peak_slots == 0, "12 rows = 4 prompts x 3 samples, held once each"
    assert len(on.batch.groups) == 0 and not on.batch.groups.buckets, "held prompts go when their rows end"



@pytest.mark.parametrize("group", [False, True], ids=["rows", "group"])
def test_fused_admissions_sample_what_a_forward_per_admission_samples_in_fewer_forwards(tiny, tok, group):
    """Admitted prompts computed inside the running rows' decode forward (one flattened forward a tick): the same
    samples, bit for bit, as prefilling them in a forward of their own, over prompts with histories of different
    lengths in a 4-row batch refilled as requests end (budgets 2..8 tokens); and no forward beyond one a tick."""
    from mcts.steps import render_steps
    from pipeline.engines.batcher import Request

    fused = _policy(tiny, tok, max_batch_rows=4, group_attention=group)
    apart = _policy(tiny, tok, max_batch_rows=4, group_attention=group, fused_admission=False)
    assert fused.batch.fused and not apart.batch.fused
    history = [render_steps([(f"y = {i}\nprint(y)", str(i), False)] * (i % 3)) for i in range(7)]
    ids = [tok(fused.builder.build(s.question, history[i]))["input_ids"] for i, s in enumerate(_states(7))]
    forwards, got = {}, {}
    for name, pol in (("fused", fused), ("apart", apart)):
        with torch.inference_mode():
            pol._prefix()  # the shared prefix's forwards are not a tick's
        forwards[name] = 0

        def hook(module, args, kwargs, output, name=name):
            forwards[name] += 1

        handle = pol.model.register_forward_hook(hook, with_kwargs=True)
        reqs = [Request(ids[i], [500 + i, 600 + i], 2 + i, 1.0, 0.9) for i in range(7)]
        try:
            with torch.inference_mode():
                pol.batch.run(reqs)
        finally:
            handle.remove()
        got[name] = [r.tokens for r in reqs]
    assert got["fused"] == got["apart"]
    assert fused.batch.joins >= 3 and apart.batch.joins >= 3, "the batch was not refilled while running"
    assert forwards["fused"] <= fused.batch.ticks
    assert forwards["apart"] >= apart.stats.decode_ticks + apart.batch.joins + 1
    assert forwards["fused"] <= forwards["apart"] - apart.batch.joins



def test_fused_admissions_refuse_a_model_whose_attention_would_ignore_the_flattened_tick(tiny, tok):
    pol = _policy(tiny, tok, shared_prefix_attention=False)  # sdpa attention: fused ticks are off
    assert not pol.batch.fused
    pol.batch.fused = True
    with pytest.raises(RuntimeError, match="engines.fused_admission false"):
        pol.propose(_states(1), 2)
    pol.batch.fused = False
    assert pol.propose(_states(1), 2) == _policy(tiny, tok, shared_prefix_attention=False).propose(_states(1), 2)

# -- CPU fast paths (auto's probe and its cache: test_engines_fastpath.py) ------------------------------------


@pytest.mark.parametrize("path", ["bf16", "int8"])
def test_named_fast_paths_convert_the_model(tiny, tok, path):
    pol = _policy(tiny, tok, cpu_fast_path=path, gen=GenerationConfig(temperature=0.0, max_new_tokens_step=6))
    if path == "bf16":
        assert pol.model.dtype == torch.bfloat16
    else:
        assert any("quantized" in type(m).__module__ for m in pol.model.modules()), "no quantized linear layer"
    out = pol.propose(_states(2), 1)
    assert all(isinstance(p[0].text, str) for p in out)


def test_fast_path_config_is_checked():
    assert EngineConfig().cpu_fast_path == "auto"
    with pytest.raises(ValueError, match="cpu_fast_path='fp16'"):
        EngineConfig(cpu_fast_path="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix_cache_mb=-1"):
        EngineConfig(prefix_cache_mb=-1)
