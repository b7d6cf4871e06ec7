"""pipeline.engines: config checks, prompts, and the transformers backend on tiny models built here.

Two tiny models:
- ``tiny-random`` (rounds.models): random weights, varied text; checks batching, prefix sharing, left
  padding and positions against plain ``model.generate``, and seed reproducibility.
- a *scripted* one-layer Llama built in this file: its attention and MLP outputs are zeroed, so the next
  token depends only on the current one, and its embeddings / head encode a small transition table
  (e.g. " two" -> <end_of_step> | <end_of_answer> | EOS with equal odds). Its output is known exactly,
  which is what stop-string, EOS and budget handling need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mcts.protocols import Proposal, SearchState
from mcts.steps import ANSWER_END, BRACE_STOP, OUTPUT_STOP, STEP_END, parse_step, split_steps
from pipeline.confload import ConfigError, build
from pipeline.engines import EngineConfig, GenerationConfig, PromptBuilder, make_policy, with_generation
from pipeline.engines.common import cut_at_stop, sample_seed, stop_strings
from pipeline.engines.prompts import EXAMPLE_SETS, EXAMPLES, SYSTEM_PROMPT
from rounds.models import load_tokenizer

Q1 = "Tom has 3 apples and buys 5 more. How many apples does he have?"
Q2 = "What is 12 times 7?"


# -- config ------------------------------------------------------------------------------------------


def test_config_defaults_are_valid_and_bad_values_name_the_field():
    cfg = EngineConfig()
    assert cfg.backend == "transformers" and cfg.policy_model == "embedded:smollm2-135m"
    assert cfg.generation.max_new_tokens("solution") > cfg.generation.max_new_tokens("step")
    with pytest.raises(ValueError, match=r"top_p=0\.0: must be in \(0, 1\]"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ConfigError, match=r"engines\.generation\.temperature=-1\.0: must be in \[0, 5\]"):
        build(EngineConfig, {"generation": {"temperature": -1.0}}, "engines")
    with pytest.raises(ValueError, match="backend='http': http.endpoints is empty"):
        EngineConfig(backend="http")
    with pytest.raises(ConfigError, match=r"engines\.http\.endpoints\[0\]='localhost:8000'"):
        build(EngineConfig, {"http": {"endpoints": ["localhost:8000"]}}, "engines")
    with pytest.raises(ValueError, match="device='gpu'"):
        EngineConfig(device="gpu")


def test_stop_strings_per_mode_and_cutting():
    assert stop_strings("step") == (STEP_END, ANSWER_END, OUTPUT_STOP)
    assert stop_strings("solution") == (ANSWER_END, OUTPUT_STOP, BRACE_STOP)
    with pytest.raises(ValueError, match="mode='steps'"):
        stop_strings("steps")
    # The earliest stop wins, text before it is kept as is.
    assert cut_at_stop("a\n<end_of_step>\nb<end_of_answer>", stop_strings("step")) == Proposal("a\n", STEP_END)
    assert cut_at_stop("a<end_of_step>b<end_of_answer>c", stop_strings("solution")) == Proposal(
        "a<end_of_step>b", ANSWER_END
    )
    assert cut_at_stop("no stop", stop_strings("step")) == Proposal("no stop", None)
    assert sample_seed(7, 0) == sample_seed(7, 0) and sample_seed(7, 0) != sample_seed(7, 1)


# -- prompts -----------------------------------------------------------------------------------------


def test_prompt_uses_the_chat_template_and_appends_history(tok):
    b = PromptBuilder(tok, few_shot=False)
    history = "# x is 3\nx = 3\n<end_of_step>\n"
    text = b.build(Q1, history)
    # SmolLM2's template: system turn, user turn, then the opened assistant turn followed by the steps so far.
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
        f"<|im_start|>assistant\n{history}"
    )
    assert b.build(Q1) + history == text, "SFT prompt + completion must equal the inference prompt"
    assert text.startswith(b.shared_prefix) and b.shared_prefix.endswith("<|im_start|>user\n")


def test_few_shot_examples_are_earlier_turns_in_the_step_format(tok):
    b = PromptBuilder(tok, few_shot=True, n_examples=2)
    text = b.build(Q2)
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    assert text.index(EXAMPLES[0].question) < text.index(EXAMPLES[1].question) < text.index(Q2)
    assert "What is 12" not in b.shared_prefix and EXAMPLES[1].solution in b.shared_prefix
    assert PromptBuilder(tok, few_shot=False, n_examples=2).build(Q2).count("<|im_start|>user") == 1
    for ex in EXAMPLES:  # the examples must be what the parser accepts, ending in the right answer
        steps = [parse_step(s) for s in split_steps(ex.solution)]
        assert steps[-1].is_final and not any(s.is_final for s in steps[:-1])
    assert parse_step(split_steps(EXAMPLES[0].solution)[-1]).answer == "8"  # 20 - 4*3


# Hand-checked answers of every worked example: arithmetic 20 - 4*3 = 8 and 6*5 - 7 = 23; countdown 3*7 = 21
# from (3, 7, 2) and 8*4 - 5 = 27 from (8, 5, 4).
_EXPECTED = {"arithmetic": ["8", "23"], "countdown": [([3, 7, 2], 21), ([8, 5, 4], 27)]}


@pytest.mark.parametrize("name", sorted(EXAMPLE_SETS))
def test_every_worked_example_runs_prints_what_it_shows_and_ends_right(name):
    import contextlib
    import io

    from data.expression import evaluate

    examples = EXAMPLE_SETS[name]
    assert len(examples) == len(_EXPECTED[name])
    for ex, expected in zip(examples, _EXPECTED[name], strict=True):
        steps = [parse_step(s) for s in split_steps(ex.solution)]
        assert steps[-1].is_final and not any(s.is_final for s in steps[:-1])
        scope: dict = {}
        for (_text, shown, final), parsed in zip(ex.steps, steps, strict=True):
            if final:
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(parsed.code, scope)  # noqa: S102 - the project's own example code
            assert out.getvalue().strip() == shown, f"{name} example {ex.question[:30]!r}: step prints {out.getvalue()!r}"
            assert parsed.code.strip(), "a non-final example step must hold code (search.require_code)"
        if name == "countdown":
            numbers, target = expected
            assert ", ".join(map(str, numbers)) in ex.question and f"make {target}" in ex.question
            assert evaluate(steps[-1].answer, numbers) == target
        else:
            assert steps[-1].answer == expected


def test_example_set_is_chosen_by_config_and_checked(tok):
    b = PromptBuilder(tok, few_shot=True, n_examples=2, examples="countdown")
    assert EXAMPLE_SETS["countdown"][1].solution in b.shared_prefix and EXAMPLES[0].question not in b.build(Q2)
    with pytest.raises(ValueError, match="unknown example set"):
        PromptBuilder(tok, few_shot=True, examples="chess")
    with pytest.raises(ValueError, match="must be one of arithmetic, countdown"):
        EngineConfig(examples="chess")
    with pytest.raises(ValueError, match="must be in 0..2"):
        EngineConfig(examples="countdown", few_shot_examples=3)


def test_builder_rejects_tokenizer_without_template(tok):
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(ValueError, match="'base-model' has no chat template"):
        PromptBuilder(NoTemplate())


# -- transformers backend on tiny-random -------------------------------------------------------------


def _policy(path: Path, tok, **kw):
    from pipeline.engines.hf_policy import TransformersPolicy

    gen = kw.pop("gen", GenerationConfig(temperature=0.0, max_new_tokens_step=12))
    return TransformersPolicy(
        path, PromptBuilder(tok, few_shot=kw.pop("few_shot", True)), gen, kw.pop("mode", "step"), device="cpu", **kw
    )


def test_greedy_batch_matches_generate_one_by_one(tiny, tok):
    # Prompts of different lengths in one batch (left padding after the shared prefix) must give exactly
    # what model.generate gives for each prompt alone.
    pol = _policy(tiny, tok)
    states = [SearchState("a", Q1, "", 1), SearchState("b", Q2, "# seven\nx = 7\n<end_of_step>\n", 2)]
    got = pol.propose(states, 2)
    for s, props in zip(states, got, strict=True):
        enc = tok(pol.builder.build(s.question, s.history), return_tensors="pt", add_special_tokens=False)
        ref = pol.model.generate(**enc, max_new_tokens=12, do_sample=False)
        expect = tok.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        assert [p.text for p in props] == [expect, expect], f"{s.tree_id}: {props} vs {expect!r}"
    # Prefix sharing is an optimisation only: without it the text is the same.
    assert _policy(tiny, tok, share_prefix=False).propose(states, 2) == got
    assert pol.stats.prefill_tokens < 2 * len(tok(pol.builder.build(Q1))["input_ids"]), "prefix computed once"


def test_sampling_is_reproducible_per_state_seed(tiny, tok):
    pol = _policy(tiny, tok, gen=GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens_step=8))
    s1, s2 = SearchState("a", Q1, "", 11), SearchState("b", Q2, "", 12)
    both = pol.propose([s1, s2], 3)
    assert len(both) == 2 and all(len(p) == 3 for p in both)
    assert len({p.text for p in both[0]}) == 3, f"k samples must differ: {both[0]}"
    assert pol.propose([s1, s2], 3) == both, "same states, same seeds: same samples"
    assert pol.propose([s2, s1], 3) == both[::-1], "order and batch company do not change a state's samples"
    assert pol.propose([s1], 3) == both[:1]
    other = pol.propose([SearchState("a", Q1, "", 99)], 3)
    assert other[0] != both[0], "another seed, other samples"
    # Equal prompts are prefilled once but still sampled with their own seeds.
    twins = pol.propose([s1, SearchState("a2", Q1, "", 99)], 3)
    assert twins == [both[0], other[0]]


def test_top_p_sorts_only_flat_rows_and_keeps_each_rows_pick():
    """A flat row (its nucleus past the top 256 tokens) is sorted on its own: it can pick beyond the top 256,
    and the peaked rows batched with it pick what they pick alone (sorting the whole batch for the flat row, as
    before, ordered a peaked row's tied tokens otherwise than its own top-k: its pick depended on its company)."""
    import torch

    from pipeline.engines.hf_policy import TransformersPolicy

    vocab, top_p = 1000, 0.95
    flat = torch.linspace(0.0, 1.0, vocab)  # distinct, nearly uniform: the nucleus is ~950 tokens
    peaked = torch.zeros(vocab)
    tied = set((torch.arange(40) * 97 % vocab).tolist())
    peaked[list(tied)] = 8.0  # 40 equally likely tokens: a full sort and topk order them differently

    def picks(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return TransformersPolicy._sample(torch.stack(rows), gens, 1.0, top_p).tolist()

    ranks = []
    for seed in range(20):
        batch = picks([peaked, flat, peaked], [seed, 100 + seed, 200 + seed])
        assert batch == [picks([peaked], [seed])[0], picks([flat], [100 + seed])[0], picks([peaked], [200 + seed])[0]]
        assert {batch[0], batch[2]} <= tied
        rank = vocab - 1 - batch[1]  # linspace: token vocab - 1 is the likeliest
        probs = torch.softmax(flat, -1).flip(0)
        assert probs[:rank].sum() < top_p, f"token of rank {rank} is outside the flat row's nucleus"
        ranks.append(rank)
    assert max(ranks) >= 256, f"the flat row never picked past the top 256: {ranks}"


def test_rows_are_chunked_by_max_batch_rows(tiny, tok):
    pol = _policy(tiny, tok, max_batch_rows=2)
    wide = _policy(tiny, tok, max_batch_rows=64)
    states = [SearchState(f"t{i}", f"What is {i} plus {i}?", "", i) for i in range(3)]
    assert pol.propose(states, 2) == wide.propose(states, 2)


def test_make_policy_builds_the_transformers_backend(tiny):
    cfg = EngineConfig(
        policy_model="tiny-random", device="cpu", generation=GenerationConfig(temperature=0.0, max_new_tokens_step=3)
    )
    pol = make_policy(cfg, mode="step", few_shot=False)
    assert type(pol).__name__ == "TransformersPolicy" and not pol.builder.examples
    out = pol.propose([SearchState("a", Q1, "", 0)], 2)
    assert len(out) == 1 and len(out[0]) == 2 and out[0][0].stop is None  # 3 tokens: the budget ran out
    with pytest.raises(ValueError, match="k=0"):
        pol.propose([SearchState("a", Q1, "", 0)], 0)


def test_with_generation_shares_the_model_and_changes_only_decoding(tiny):
    cfg = EngineConfig(
        policy_model="tiny-random", device="cpu", generation=GenerationConfig(temperature=1.0, max_new_tokens_step=4)
    )
    sampler = make_policy(cfg, mode="step")
    greedy = with_generation(sampler, GenerationConfig(temperature=0.0, max_new_tokens_step=4))
    assert greedy.model is sampler.model and sampler.gen.temperature == 1.0  # no second load, original untouched
    states = [SearchState("a", Q1, "", 0), SearchState("b", Q1, "", 1)]
    g = greedy.propose(states, 1)
    assert g[0] == g[1]  # greedy ignores the per-state seeds
    s = sampler.propose(states, 1)
    assert s[0] != s[1]  # sampling follows them
    with pytest.raises(TypeError, match="generation settings"):
        with_generation(object(), cfg.generation)  # type: ignore[arg-type]


# -- transformers backend on a scripted model: stop strings, EOS, budget ---------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tiny) -> Path:
    """A one-layer Llama whose next token is a fixed function of the current token:

    <prompt end '\\n'> -> '#' -> ' two' -> {<end_of_step>, <end_of_answer>, EOS}  (equal odds)
    <end_of_step> -> '#'   (so solution mode loops until the answer delimiter or EOS)
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("scripted")
    tok = AutoTokenizer.from_pretrained(str(tiny))
    tok.add_tokens([STEP_END, ANSWER_END])  # one token each, so every script token is distinct
    ids = {s: tok.convert_tokens_to_ids(s) for s in (STEP_END, ANSWER_END)}
    nl, hash_, two = 198, tok.encode("#", add_special_tokens=False)[0], tok.encode(" two", add_special_tokens=False)[0]
    eos = tok.eos_token_id
    table = {nl: [hash_], hash_: [two], two: [ids[STEP_END], ids[ANSWER_END], eos], ids[STEP_END]: [hash_]}
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.model.layers:  # norms back to 1; o_proj / down_proj stay 0: blocks add nothing
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        for slot, (cur, nxt) in enumerate(table.items()):
            model.model.embed_tokens.weight[cur, slot] = 1.0  # RMS-normed: 4.0 in slot (sqrt(16))
            for n in nxt:
                model.lm_head.weight[n, slot] = 10.0  # logit 40 for each successor, 0 for all else
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_step_mode_stops_at_either_delimiter_or_eos(scripted):
    tok = load_tokenizer(scripted)
    pol = _policy(scripted, tok, few_shot=False, gen=GenerationConfig(temperature=1.0, top_p=1.0))
    got = pol.propose([SearchState("a", Q1, "", 5)], 12)[0]
    # Every sample is '# two' then one of the three endings; EOS reports stop=None and is not in the text.
    assert {p.text for p in got} == {"# two"}
    assert {p.stop for p in got} == {STEP_END, ANSWER_END, None}, got
    # 12 samples -> 12 rows, each stopped after 3 tokens: '#', ' two', ending.
    assert pol.stats.new_tokens == 12 * 3


def test_solution_mode_runs_past_step_delimiters(scripted):
    tok = load_tokenizer(scripted)
    pol = _policy(
        scripted,
        tok,
        few_shot=False,
        mode="solution",
        gen=GenerationConfig(temperature=1.0, top_p=1.0, max_new_tokens_solution=40),
    )
    got = pol.propose([SearchState("a", Q1, "", 3)], 12)[0]
    for p in got:
        # '# two' repeated, joined by <end_of_step>; ends at the answer delimiter, EOS (None) or the budget.
        parts = p.text.split(STEP_END)
        assert all(part == "# two" for part in parts[:-1]), p
        assert parts[-1] in ("# two", "#", ""), p  # a budget cut can land anywhere in the cycle
        assert p.stop in (ANSWER_END, None)
    assert any(p.text.count(STEP_END) >= 1 for p in got), f"some sample should have gone past a step: {got}"
    assert any(p.stop == ANSWER_END for p in got)


def test_budget_cuts_a_row_and_reports_no_stop(scripted):
    tok = load_tokenizer(scripted)
    pol = _policy(scripted, tok, few_shot=False, gen=GenerationConfig(temperature=0.0, max_new_tokens_step=1))
    assert pol.propose([SearchState("a", Q1, "", 0)], 1) == [[Proposal("#", None)]]


def test_solution_mode_stops_after_the_line_that_closes_the_boxed_answer():
    raw = "# cost\ncost = 4 * 3\nprint(cost)\n# The answer is \\boxed{12}\n# The answer is \\boxed{12}\n# The"
    p = cut_at_stop(raw, stop_strings("solution"))
    assert (p.text, p.stop) == ("# cost\ncost = 4 * 3\nprint(cost)\n# The answer is \\boxed{12", BRACE_STOP)
    assert cut_at_stop(raw, stop_strings("step")).stop is None  # step mode runs on to its own delimiters


def test_top_p_in_blocks_picks_what_the_topk_search_picks():
    """On a large vocabulary the nucleus is looked for in each row's best blocks; every row picks what the top-k
    search over its whole row picks from the same uniform, alone or batched: peaked rows, ties across blocks
    (settled by token id), a row whose nucleus spans more blocks than are searched, and a flat row."""
    import torch

    from pipeline.engines import hf_policy
    from pipeline.engines.hf_policy import TransformersPolicy, _top_p_picks

    vocab, top_p, temp = 20_000, 0.9, 0.7
    assert vocab >= hf_policy._BLOCK_MIN_VOCAB
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(vocab, generator=g) * 2 for _ in range(6)]
    for i, r in enumerate(rows[:4]):
        r[torch.randperm(vocab, generator=g)[: 1 + 3 * i]] += 14  # a nucleus of 1, 4, 7, 10 tokens
    rows[4][[5, 64 * 40 + 3, 64 * 200 + 9, 19_999]] = 25.0  # four tied tokens in four blocks
    spread = torch.arange(0, vocab, hf_policy._BLOCK)[: 3 * hf_policy._BLOCKS]
    rows[5][spread] = 30.0  # a nucleus over more blocks than are searched: left to the top-k search
    rows.append(torch.linspace(0.0, 1.0, vocab))  # flat: past the top 256 as well
    logits = torch.stack(rows)
    probs = torch.softmax(logits / temp, -1)
    picks, ok = hf_policy._top_p_in_blocks(probs, torch.full((len(rows),), 0.5), top_p)
    assert ok.tolist() == [True] * 5 + [False, False]
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(rows))]
        got = TransformersPolicy._sample(logits, gens, temp, top_p).tolist()
        u = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(seed * 100 + i))
                         for i in range(len(rows))])
        ref = _top_p_picks(probs, u, top_p).tolist()
        assert got[:4] + got[5:] == ref[:4] + ref[5:]  # row 4: topk orders its ties its own way
        assert got[4] in {5, 64 * 40 + 3, 64 * 200 + 9, 19_999}
        alone = [TransformersPolicy._sample(logits[i:i + 1], [torch.Generator().manual_seed(seed * 100 + i)], temp,
                                            top_p).item() for i in range(len(rows))]
        assert got == alone
    ties = [TransformersPolicy._sample(logits[4:5], [torch.Generator().manual_seed(s)], temp, top_p).item()
            for s in range(40)]
    assert set(ties) == {5, 64 * 40 + 3, 64 * 200 + 9, 19_999}  # each tied token is reachable


def test_sampling_in_place_gives_the_same_picks_and_consumes_the_logits():
    """``overwrite=True`` (the running batch's scratch logits) turns the logits into probabilities in place; the
    picks are those of sampling out of place, bit for bit."""
    import torch

    from pipeline.engines.hf_policy import TransformersPolicy

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 20_000, generator=g) * 3
    for temp, top_p in ((0.7, 0.95), (1.0, 1.0), (0.4, 0.5)):
        kept = logits.clone()
        ref = TransformersPolicy._sample(kept, [torch.Generator().manual_seed(i) for i in range(5)], temp, top_p)
        assert torch.equal(kept, logits)  # out of place: the caller's logits are untouched
        scratch = logits.clone()
        got = TransformersPolicy._sample(scratch, [torch.Generator().manual_seed(i) for i in range(5)], temp, top_p,
                                         overwrite=True)
        assert torch.equal(got, ref), (got.tolist(), ref.tolist())
        assert torch.equal(scratch, torch.softmax(logits / temp, -1))  # the scratch now holds the probabilities
