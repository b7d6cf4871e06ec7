"""The policy SFT's batch prefix, computed once: the same loss and gradients for less compute.

Every SFT row of a round starts with the same tokens: the search prompt's instruction and worked examples
(``training.sft_prompt: search``). In the embedded run that shared prefix is 317 of a row's ~410 tokens, so
a batch of 2 spends three quarters of its forward and backward on computing the same prefix twice.

``shared_prefix_loss`` runs the batch's common prefix once (batch 1, with gradients), hands its keys and
values to every row as an expanded view (autograd sums the rows' gradients into the one prefix), and runs
only the rows' own tokens on top of it. Attention sees exactly what it sees in the full forward (causal:
prefix positions never attend to what follows), so the loss and the gradients are the full forward's, up to
floating-point rounding (tests/rounds/test_shared_prefix.py compares both).

It applies when the prefix predicts nothing: the loss is on completions only, and the prompt (which holds
the prefix) is masked, so no logit of a prefix position is needed. Otherwise (a row shorter than the
prefix, padding inside it, a label inside it, batch 1) it returns None and the caller runs the plain forward.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.engines.kv_cache import cache_kwargs

IGNORE = -100
MIN_PREFIX = 16  # tokens: below this the second forward costs more than the prefix saves


def common_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> int:
    """Leading tokens that are the same real token in every row and whose logits predict no label (0: none).

    Position t's logits predict ``labels[:, t + 1]``, so a prefix of length P needs ``labels[:, 1 : P + 1]``
    all ignored. At least one token of every row stays outside the prefix.
    """
    rows, width = input_ids.shape
    if rows < 2 or width < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= (attention_mask == 1).all(0)
    p = int(same.int().cumprod(0).sum())  # leading run of True
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()
    if len(labelled):
        p = min(p, int(labelled[0]))  # labels[:, j + 1] is the first label, predicted by position j: P <= j
    return min(p, width - 1)


def _expand(cache: Any, rows: int) -> Any:
    """``cache`` (batch 1) seen as ``rows`` rows: expanded views, so backward sums every row's gradient into it."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return cache


def shared_prefix_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None,
                       min_prefix: int = MIN_PREFIX) -> torch.Tensor | None:
    """The causal-LM loss of ``inputs`` (``input_ids``, ``attention_mask``, ``labels``; right padded), with the
    batch's common prefix computed once; None when it does not apply (module doc). ``model`` may be wrapped
    (its ``forward`` under autocast); ``loss_function`` and ``config`` are read from the unwrapped model."""
    if set(inputs) - {"input_ids", "attention_mask", "labels"}:
        return None  # position ids (padding-free batches) or other inputs: not this layout
    ids, labels = inputs["input_ids"], inputs.get("labels")
    mask = inputs.get("attention_mask")
    if labels is None:
        return None
    p = common_prefix_len(ids, mask, labels)
    if p < min_prefix:
        return None
    rows = ids.shape[0]
    prefix = model(input_ids=ids[:1, :p], use_cache=True, logits_to_keep=1)
    cache = _expand(prefix.past_key_values, rows)
    positions = torch.arange(p, ids.shape[1], device=ids.device).expand(rows, -1)
    out = model(input_ids=ids[:, p:], attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                use_cache=True)
    inner = getattr(model, "module", model)
    return inner.loss_function(logits=out.logits, labels=labels[:, p:], vocab_size=inner.config.vocab_size,
                               num_items_in_batch=num_items_in_batch)
