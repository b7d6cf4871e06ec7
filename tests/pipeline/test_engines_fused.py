"""pipeline.engines.fused: the C kernels compute transformers' bf16 bits (norm, residual add + norm, RoPE), a fused
model gives the unfused model's logits at decode and prefill sizes, the library is built once and reused, and a
missing compiler or an unsupported model leaves transformers' code with a reason."""

from __future__ import annotations

import copy

import pytest
import torch

from mcts.protocols import SearchState
from pipeline.engines import GenerationConfig, PromptBuilder, fastpath, fused

KERNELS, WHY = fused.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=f"no fused kernels here: {WHY}")


@pytest.fixture(scope="module")
def fp32_model():
    """Random weights in the embedded model's shapes (SmolLM2-135M: 576 wide, 9 query / 3 kv heads of 64), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_kernels_give_transformers_bits():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    assert KERNELS.lanes in (8, 16)
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(576, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(576, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        for rows, scale in ((1, 1.0), (7, 30.0), (64, 0.01), (64, 3.0), (600, 5.0)):
            a = (torch.randn(1, rows, 576, generator=g) * scale).to(torch.bfloat16)
            b = torch.randn(1, rows, 576, generator=g).to(torch.bfloat16)
            assert torch.equal(KERNELS.rms_norm(a, norm.weight, 1e-5), norm(a)), rows
            total, normed = KERNELS.add_rms_norm(a, b, norm.weight, 1e-5)
            assert torch.equal(total, a + b) and torch.equal(normed, norm(a + b)), rows
            q = torch.randn(2, rows, 9 * 64, generator=g).to(torch.bfloat16)
            k = torch.randn(2, rows, 3 * 64, generator=g).to(torch.bfloat16)
            angles = torch.randn(2, rows, 64, generator=g) * 50
            cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
            want_q, want_k = apply_rotary_pos_emb(q.view(2, rows, 9, 64).transpose(1, 2),
                                                  k.view(2, rows, 3, 64).transpose(1, 2), cos, sin)
            got_q, got_k = KERNELS.rope(q, k, cos, sin, 64)
            assert torch.equal(got_q.view(2, rows, 9, 64).transpose(1, 2), want_q), rows
            assert torch.equal(got_k.view(2, rows, 3, 64).transpose(1, 2), want_k), rows


@pytest.mark.parametrize("pack", [True, False])
def test_fused_model_gives_the_unfused_models_logits(fp32_model, pack, monkeypatch):
    calls = {"rms_norm": 0, "add_rms_norm": 0, "rope": 0}
    for name in calls:  # count the kernels' calls: equal logits must not come from falling back to transformers
        def counted(*args, _name=name, _f=getattr(KERNELS, name)):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(KERNELS, name, counted)
    from transformers import DynamicCache

    plain = fastpath.apply(fp32_model, "bf16", pack=pack)
    fast = fastpath.apply(fp32_model, "bf16", pack=pack)
    assert fused.fuse(fast, KERNELS) == 2
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, length in ((1, 1), (3, 7), (33, 1), (64, 1), (2, 300)):
            ids = torch.randint(0, fp32_model.config.vocab_size, (rows, length), generator=g)
            assert torch.equal(fast(input_ids=ids).logits, plain(input_ids=ids).logits), (rows, length)
        # Decoding on a cache: the layers' cache updates go through the fused attention too.
        ids = torch.randint(0, fp32_model.config.vocab_size, (4, 20), generator=g)
        outs = []
        for model in (plain, fast):
            cache = DynamicCache(config=model.config)
            steps = [model(input_ids=ids, cache=cache, use_cache=True).logits]
            for _ in range(3):
                out = model(input_ids=steps[-1][:, -1:].argmax(-1), cache=cache, use_cache=True)
                steps.append(out.logits)
            outs.append(steps)
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    # 9 forwards of the fused model: 2 layers x one norm + one add + norm + RoPE each, and the final norm.
    assert calls == {"rms_norm": 9 * 3, "add_rms_norm": 9 * 2, "rope": 9 * 2}


def test_library_is_built_once_into_the_cache(tmp_path):
    built, why = fused.load(tmp_path)
    assert built is not None, why
    libs = list(tmp_path.glob("fused-*.so"))
    assert len(libs) == 1 and built.path == libs[0]
    mtime = libs[0].stat().st_mtime_ns
    again, _ = fused.load(tmp_path)
    assert again is built and libs[0].stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p != libs[0]]  # no temporary file left behind


def test_a_broken_compiler_or_model_keeps_transformers_code(tmp_path, monkeypatch, fp32_model):
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    kernels, why = fused.load(tmp_path / "other")
    assert kernels is None and "compiling fused_kernels.c with false failed (exit 1)" in why
    assert not list((tmp_path / "other").glob("*"))  # nothing half-built is left to load later
    assert "dtype torch.float32" in fused.supported(fp32_model)
    with pytest.raises(ValueError, match="cannot fuse"):
        fused.fuse(fp32_model, KERNELS)
    assert fused.install(fp32_model).startswith("fused kernels off: dtype torch.float32")
    odd = copy.copy(KERNELS)
    odd.lanes = 0  # a torch build whose sum adds in an order the norm does not know
    with pytest.raises(ValueError, match="sum order"):
        fused.fuse(fastpath.apply(fp32_model, "bf16"), odd)


def test_engine_on_fused_kernels_samples_what_it_samples_without(tiny, tok):
    from pipeline.engines.hf_policy import TransformersPolicy

    states = [SearchState(f"p{i}", f"What is {i} + {2 * i}?", "", 10 + i) for i in range(3)]
    texts, fused_layers = {}, {}
    for fuse in (False, True):
        engine = TransformersPolicy(tiny, PromptBuilder(tok, few_shot=False),
                                    GenerationConfig(temperature=0.8, max_new_tokens_step=12), "step", device="cpu",
                                    cpu_fast_path="bf16", max_batch_rows=8, fused_kernels=fuse)
        fused_layers[fuse] = sum(hasattr(layer, "_fused_kernels") for layer in engine.model.model.layers)
        texts[fuse] = [[p.text for p in props] for props in engine.propose(states, 3)]
    assert fused_layers == {False: 0, True: len(engine.model.model.layers)}
    assert texts[True] == texts[False]


needs_attention = pytest.mark.skipif(KERNELS is None or not KERNELS.attention,
                                     reason="the library's decode attention needs AVX-512 BF16")


def _decode_case(rows=5, kv_heads=3, g=3, width=37, seed=0):
    """Queries [rows, kv_heads, g, 64] and keys/values laid out as the engine's cache is (a view of columns of a
    wider buffer), left padding of 0..rows-1 columns masked; bf16."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv_heads, g, 64, generator=gen).to(torch.bfloat16)
    buf_k = torch.randn(rows + 2, kv_heads, width + 20, 64, generator=gen).to(torch.bfloat16)
    buf_v = torch.randn(rows + 2, kv_heads, width + 20, 64, generator=gen).to(torch.bfloat16)
    k, v = buf_k[:rows, :, 5 : 5 + width], buf_v[:rows, :, 5 : 5 + width]
    mask = torch.zeros(rows, width)
    for r in range(rows):
        mask[r, :r] = float("-inf")
    return q, k, v, mask.to(torch.bfloat16)[:, None, None, :]


def _softmax_reference(q, k, v, mask, scale):
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.float()
    return torch.softmax(scores, -1) @ v.float(), torch.logsumexp(scores, -1)


@needs_attention
def test_decode_attention_is_softmax_attention_and_rows_stay_independent():
    q, k, v, mask = _decode_case()
    for m in (mask, None):
        out, lse = KERNELS.decode_attention(q, k, v, m, 0.125)
        want, want_lse = _softmax_reference(q, k, v, m, 0.125)
        assert out.dtype == lse.dtype == torch.float32
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)
    out, lse = KERNELS.decode_attention(q, k, v, mask, 0.125)
    alone, alone_lse = KERNELS.decode_attention(q[2:3], k[2:3], v[2:3], mask[2:3], 0.125)
    assert torch.equal(alone, out[2:3]) and torch.equal(alone_lse, lse[2:3])
    # What it does not take, it declines (the caller then runs flash attention).
    assert KERNELS.decode_attention(q[..., :32], k[..., :32], v[..., :32], None, 0.125) is None
    assert KERNELS.decode_attention(q.float(), k.float(), v.float(), None, 0.125) is None
    assert KERNELS.decode_attention(q, k, v, mask.float(), 0.125) is None


@needs_attention
def test_cascade_decode_on_the_kernel_is_as_close_to_fp32_as_flash():
    import types

    from pipeline.engines import cascade

    q, k, v, mask = _decode_case(rows=6, width=50, seed=3)
    b, kvh, g, d = q.shape
    query = q.reshape(b, kvh * g, 1, d)
    gen = torch.Generator().manual_seed(4)
    prefix = [(torch.randn(1, kvh, 30, d, generator=gen).to(torch.bfloat16),
               torch.randn(1, kvh, 30, d, generator=gen).to(torch.bfloat16))]
    flash_module = types.SimpleNamespace(layer_idx=0)
    calls = []

    def spy(name):
        def counted(*args):
            calls.append((name, getattr(KERNELS, name)(*args)))
            return calls[-1][1]
        return counted

    fused_module = types.SimpleNamespace(layer_idx=0, _fused_kernels=types.SimpleNamespace(
        decode_attention=spy("decode_attention"), decode_attention_merged=spy("decode_attention_merged")))
    got, _ = cascade.attention(fused_module, query, k, v, mask, scaling=0.125, shared_prefix=prefix)
    base, _ = cascade.attention(flash_module, query, k, v, mask, scaling=0.125, shared_prefix=prefix)
    pk, pv = prefix[0]
    full_k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    full_v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    full_mask = torch.cat([torch.zeros(b, 1, 1, 30, dtype=torch.bfloat16), mask], -1)
    want = _softmax_reference(q, full_k, full_v, full_mask, 0.125)[0].reshape(b, 1, kvh * g, d)
    assert got.dtype == base.dtype == torch.bfloat16 and got.shape == base.shape == want.shape
    err, flash_err = (got.float() - want).abs().max(), (base.float() - want).abs().max()
    assert err <= flash_err + 1e-6, (err, flash_err)
    assert [(name, out is not None) for name, out in calls] == [("decode_attention_merged", True)]  # not flash
