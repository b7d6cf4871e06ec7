"""The SFT batch's common prefix computed once: the loss and every gradient equal the full forward's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rounds.models import resolve_model
from rounds.shared_prefix import IGNORE, common_prefix_len, shared_prefix_loss
from rounds.train_config import StageConfig, TrainingConfig
from rounds.train_policy import build_sft_trainer

INSTRUCTION = ("Solve the problem step by step. Each step is a comment and Python code; end with the answer in a "
               "box.\nExample: Tom has 3 apples and buys 4 more.\n# add\nx = 3 + 4\nprint(x)\n# The answer is 7\n")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny-random")), dtype=torch.float32)


def batch(prefix: list[int], rows: list[tuple[list[int], list[int]]], pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; each row = prefix + prompt tail (masked) + completion."""
    seqs = [(prefix + tail + comp, [IGNORE] * (len(prefix) + len(tail)) + comp) for tail, comp in rows]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(s)] = torch.tensor(s), 1, torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_common_prefix_stops_at_the_first_difference_padding_and_label():
    b = batch(list(range(1, 21)), [([30, 31], [40, 41, 42]), ([30, 32, 33], [44])])
    assert common_prefix_len(b["input_ids"], b["attention_mask"], b["labels"]) == 21  # 20 shared + token 30
    # A label at position 10 of one row: position 9's logits predict it, so the prefix holds positions 0..8 at most.
    b["labels"][1, 10] = 7
    assert common_prefix_len(b["input_ids"], b["attention_mask"], b["labels"]) == 9
    one = {k: v[:1] for k, v in b.items()}
    assert common_prefix_len(one["input_ids"], one["attention_mask"], one["labels"]) == 0  # nothing to share


@pytest.mark.parametrize("num_items", [None, 7])
def test_loss_and_gradients_equal_the_full_forward(tiny, num_items):
    prefix = list(range(100, 140))
    b = batch(prefix, [([5, 6], [7, 8, 9, 10]), ([5, 11, 12], [13, 14]), ([15], [16, 17, 18, 19, 20, 21])])
    tiny.zero_grad()
    full = tiny(**b, num_items_in_batch=num_items).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    tiny.zero_grad()
    shared = shared_prefix_loss(tiny, dict(b), num_items)
    assert shared is not None
    shared.backward()
    assert float(shared) == pytest.approx(float(full), rel=1e-5)
    got = {n: p.grad for n, p in tiny.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_no_shared_prefix_means_the_plain_forward(tiny):
    b = batch([1, 2], [([5, 6], [7, 8]), ([9], [10, 11])])  # 2 shared tokens: below the minimum
    assert shared_prefix_loss(tiny, dict(b)) is None
    assert shared_prefix_loss(tiny, {**b, "position_ids": b["attention_mask"]}) is None  # another batch layout


def test_sft_trainer_computes_the_shared_prefix_once_with_the_same_loss(tmp_path):
    data = {"prompt": [f"{INSTRUCTION}Question: what is {i} + {i}?\n" for i in range(4)],
            "completion": [f"x = {i} + {i}\nprint(x)\n<end_of_answer>\n" for i in range(4)]}
    losses = {}
    for shared in (True, False):
        cfg = TrainingConfig(shared_prefix=shared, sft_loss="plain", precision="fp32",
                             policy=StageConfig(batch_size=4, max_steps=1, max_length=256))
        trainer, _ = build_sft_trainer("tiny-random", data, tmp_path / str(shared), cfg)
        b = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[shared] = float(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=None))
        assert trainer.shared_prefix_batches == int(shared)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
