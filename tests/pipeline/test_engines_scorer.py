"""PPM scoring of search states: batched, deterministic, the builder's text, scores in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcts.protocols import SearchState
from pipeline.engines import EngineConfig, make_scorer
from pipeline.engines.scorer import TransformersScorer

STATES = [
    SearchState("a", "What is 2 plus 3?", "", 1),
    SearchState("a", "What is 2 plus 3?", "# add them\nx = 2 + 3\nprint(x)\n# output: 5\n<end_of_step>\n", 2),
    SearchState("b", "A box holds 6 rows of 5 eggs. How many eggs?", "# rows times eggs\n<end_of_step>\n", 3),
    SearchState("c", "What is 9 minus 4?", "# The answer is \\boxed{5}\n<end_of_answer>\n", 4),
    SearchState("d", "x", "", 5),
]


@pytest.fixture(scope="module")
def ppm_dir(tmp_path_factory) -> Path:
    from rounds.ppm_model import init_ppm

    model, tok = init_ppm("tiny-random", seed=3)  # a fresh, seeded head on the tiny backbone
    out = tmp_path_factory.mktemp("ppm")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_scores_are_deterministic_batched_and_in_range(ppm_dir):
    scorer = TransformersScorer(ppm_dir, device="cpu", batch_size=4)
    scores = scorer.score(STATES)
    assert len(scores) == len(STATES) and all(-1.0 <= s <= 1.0 for s in scores)
    assert scorer.score(STATES) == scores, "same input, same scores"
    single = TransformersScorer(ppm_dir, device="cpu", batch_size=1)
    one_by_one = [single.score([s])[0] for s in STATES]
    assert one_by_one == pytest.approx(scores, abs=1e-5), "padding and batch size must not change a score"
    assert scorer.score(STATES[::-1]) == pytest.approx(scores[::-1], abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == len(STATES), f"different prefixes, different scores: {scores}"
    assert scorer.score([]) == []


def test_scorer_reads_the_policy_prompt_text(ppm_dir):
    from rounds.ppm_model import load_ppm, ppm_scores

    scorer = make_scorer(EngineConfig(device="cpu"), ppm_dir)
    text = scorer.texts(STATES[1:2])[0]
    assert text == scorer.builder.build(STATES[1].question, STATES[1].history)
    assert text.endswith("<|im_start|>assistant\n" + STATES[1].history)
    model, tok = load_ppm(ppm_dir, dtype=scorer.model.dtype)  # auto: bf16 on a CPU with bf16 units (scorer_dtype)
    assert scorer.score(STATES[1:2]) == pytest.approx(ppm_scores(model, tok, [text]), abs=1e-6)


def test_auto_scores_in_bf16_where_the_cpu_computes_it_natively(monkeypatch):
    import torch

    from pipeline.engines import fastpath
    from pipeline.engines.scorer import scorer_dtype

    monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert scorer_dtype("auto", "cpu") == torch.bfloat16
    assert scorer_dtype("float32", "cpu") == torch.float32  # engines.dtype: float32 keeps fp32
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset({"avx2"}))
    assert scorer_dtype("auto", "cpu") == torch.float32  # emulated bf16 would be slower
    assert scorer_dtype("auto", "cuda") == torch.bfloat16


def test_a_policy_checkpoint_is_not_a_ppm(tmp_path):
    from rounds.models import resolve_model

    with pytest.raises(ValueError, match="not a PPM checkpoint"):
        TransformersScorer(resolve_model("tiny-random"), device="cpu")
