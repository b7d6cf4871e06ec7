"""The PPM model: a policy checkpoint + fresh scalar head; scores = tanh(head at the last token), saved and
reloaded as a normal HF checkpoint that scores identically."""

from __future__ import annotations

import json

import pytest
import torch

from rounds.models import resolve_model
from rounds.ppm_model import (
    PPM_CONFIG_KEY,
    encode_texts,
    init_ppm,
    is_ppm_checkpoint,
    load_ppm,
    pad_batch,
    ppm_rewards,
    ppm_scores,
)

TEXTS = [
    "Question: 3 + 5?\n# add\nx = 3 + 5\nprint(x)\n# output: 8\n<end_of_step>\n",
    "Question: 3 + 5?\n",
    "Question: 2 * 4?\n# The answer is \\boxed{8}\n<end_of_answer>\n",
]


@pytest.fixture(scope="module")
def policy_dir():
    return resolve_model("tiny-random")


@pytest.fixture(scope="module")
def ppm(policy_dir):
    return init_ppm(policy_dir, seed=0)


@pytest.fixture(scope="module")
def saved_ppm(ppm, tmp_path_factory):
    model, tok = ppm
    out = tmp_path_factory.mktemp("ppm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_init_adds_a_scalar_head_and_marks_the_config(ppm, policy_dir):
    model, tok = ppm
    assert model.config.num_labels == 1
    assert model.score.weight.shape == (1, model.config.hidden_size)
    assert getattr(model.config, PPM_CONFIG_KEY)["score"] == "tanh"
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    assert not is_ppm_checkpoint(policy_dir)


def test_fresh_head_is_seeded(policy_dir, ppm):
    again, _ = init_ppm(policy_dir, seed=0)
    other, _ = init_ppm(policy_dir, seed=1)
    assert torch.equal(again.score.weight, ppm[0].score.weight)
    assert not torch.equal(other.score.weight, ppm[0].score.weight)


def test_scores_are_tanh_of_the_head_at_the_last_token(ppm):
    model, tok = ppm
    scores = ppm_scores(model, tok, TEXTS, batch_size=2)
    assert all(-1.0 <= s <= 1.0 for s in scores), scores
    # By hand for one text: backbone -> head on every position -> the last position -> tanh.
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # [1, seq, hidden]
        expected = torch.tanh(model.score(hidden)[0, -1, 0]).item()
    assert scores[0] == pytest.approx(expected, abs=1e-6)


def test_scores_do_not_depend_on_batching_or_order(ppm):
    model, tok = ppm
    together = ppm_scores(model, tok, TEXTS, batch_size=3)
    alone = [ppm_scores(model, tok, [t], batch_size=1)[0] for t in TEXTS]
    reversed_ = ppm_scores(model, tok, TEXTS[::-1], batch_size=2)[::-1]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together == pytest.approx(reversed_, abs=1e-5)
    assert ppm_scores(model, tok, TEXTS, batch_size=3) == together  # deterministic


def test_a_text_ending_in_the_pad_token_is_scored_at_that_token(ppm):
    # The model's own forward pools at the last token that is *not* the pad id, so for a text ending in
    # the pad token (here EOS) it would read one token early; ppm_rewards reads the last attended token.
    model, tok = ppm
    plain = "Question: 1 + 1?"
    with_pad = plain + tok.pad_token
    s_plain, s_pad = ppm_scores(model, tok, [plain, with_pad], batch_size=2)
    ids, mask = pad_batch(encode_texts(tok, [with_pad])[0], tok.pad_token_id)
    with torch.no_grad():
        pooled_by_model = torch.tanh(model(input_ids=ids, attention_mask=mask).logits[0, 0]).item()
    assert pooled_by_model == pytest.approx(s_plain, abs=1e-6)  # the model's pooling skips the final EOS
    assert s_pad != pytest.approx(s_plain, abs=1e-6)


def test_rewards_carry_gradients_to_the_head_and_backbone(ppm):
    model, tok = ppm
    ids, mask = pad_batch(encode_texts(tok, TEXTS[:2])[0], tok.pad_token_id)
    model.zero_grad()
    ppm_rewards(model, ids, mask).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_reload_gives_identical_scores(ppm, saved_ppm):
    model, tok = ppm
    assert is_ppm_checkpoint(saved_ppm)
    assert json.loads((saved_ppm / "config.json").read_text())[PPM_CONFIG_KEY]["pooling"] == "last_attended_token"
    loaded, loaded_tok = load_ppm(saved_ppm)
    assert not loaded.training
    assert ppm_scores(loaded, loaded_tok, TEXTS, batch_size=2) == ppm_scores(model, tok, TEXTS, batch_size=2)


def test_init_from_a_ppm_keeps_its_head(saved_ppm, ppm):
    again, _ = init_ppm(saved_ppm, seed=123)  # a different seed would give a different fresh head
    assert torch.equal(again.score.weight, ppm[0].score.weight)


def test_load_ppm_refuses_a_policy_checkpoint(policy_dir):
    with pytest.raises(ValueError, match="not a PPM checkpoint"):
        load_ppm(policy_dir)


def test_encode_keeps_the_end_of_long_texts(ppm):
    _, tok = ppm
    full, cut = encode_texts(tok, TEXTS)
    assert cut == []
    short, cut = encode_texts(tok, TEXTS, max_length=4)
    assert cut == [0, 1, 2]
    assert short[0] == full[0][-4:]
    with pytest.raises(ValueError, match="PPM text #1 is empty"):
        encode_texts(tok, ["a", ""])


def test_scoring_restores_train_mode_and_checks_batch_size(ppm):
    model, tok = ppm
    model.train()
    ppm_scores(model, tok, TEXTS[:1])
    assert model.training
    model.eval()
    assert ppm_scores(model, tok, []) == []
    with pytest.raises(ValueError, match="batch_size=0"):
        ppm_scores(model, tok, TEXTS, batch_size=0)
