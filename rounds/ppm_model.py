"""The process preference model (PPM): the policy backbone plus a scalar value head.

On disk a PPM is an ordinary Hugging Face ``*ForSequenceClassification`` checkpoint with ``num_labels=1``
(backbone + ``score`` head in one directory), whose ``config.json`` carries ``"open_rstar_ppm"``. That key
records how the score is read, the same way in training and in inference:

    score(text) = tanh(head(hidden state of the last token of text))      in [-1, 1]

rStar-Math trains on the raw head output and applies tanh only at inference; here the tanh is part of the
model, so the Bradley-Terry loss sees exactly the number the search later uses. Everything that scores goes
through ``ppm_rewards`` (tensors, used by the trainer's loss) or ``ppm_scores`` (texts, used by the held-out
evaluation and by the inference scorer), and texts become token ids only through ``encode_texts``.

The "last token" is the last position the attention mask covers (batches are right-padded), not the last
non-pad token id the model's own ``forward`` looks for: a text whose last token happens to be the pad token
(often EOS) would otherwise be scored one token early.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rounds.models import resolve_model

if TYPE_CHECKING:
    import torch

PPM_CONFIG_KEY = "open_rstar_ppm"
PPM_FORMAT = {"version": 1, "score": "tanh", "pooling": "last_attended_token", "padding_side": "right"}
# Tokens a PPM reads (longer texts keep their end). ONE length per PPM, used by training and scoring alike: the
# trainer records ``training.ppm.max_length`` in the checkpoint (``PPM_FORMAT["max_length"]``) and every scorer
# reads it back (``checkpoint_max_length``), so a PPM is never scored on text it was not trained to read.
# rStar-Math likewise uses one ``max_length`` (train/rm.py ``preprocess_value_dataset``). This default applies
# only to a checkpoint that records none (written before the length was recorded); it is TrainingConfig's.
DEFAULT_PPM_MAX_LENGTH = 1024


def is_ppm_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint directory written as a PPM (its config carries the PPM key)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return PPM_CONFIG_KEY in json.loads(config.read_text())


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path}: no pad and no EOS token; set tokenizer.pad_token and save it")
        tok.pad_token = tok.eos_token
    # Right padding keeps every text at positions 0..n-1 (Llama-style models derive positions from the
    # index, not the mask), so a text scores the same alone or in a batch.
    tok.padding_side = "right"
    return tok


def checkpoint_max_length(path: str | Path) -> int:
    """The truncation length a PPM checkpoint was trained with (``DEFAULT_PPM_MAX_LENGTH`` if it records none)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return int(config.get(PPM_CONFIG_KEY, {}).get("max_length") or DEFAULT_PPM_MAX_LENGTH)


def _mark_as_ppm(model, tok, max_length: int | None = None) -> None:
    if model.config.num_labels != 1:
        raise ValueError(f"PPM head has num_labels={model.config.num_labels}: must be 1 (a scalar value head)")
    fmt = dict(PPM_FORMAT)
    previous = getattr(model.config, PPM_CONFIG_KEY, None) or {}
    fmt["max_length"] = int(max_length or previous.get("max_length") or DEFAULT_PPM_MAX_LENGTH)
    setattr(model.config, PPM_CONFIG_KEY, fmt)
    model.config.get_text_config().pad_token_id = tok.pad_token_id


def init_ppm(init_model: str | Path, *, seed: int = 0, dtype: Any = None, max_length: int | None = None):
    """(model, tokenizer) to train: a policy checkpoint gets a fresh scalar head (seeded); a PPM checkpoint
    (a previous round's, when training continues instead of restarting from base) keeps its trained head.
    ``max_length``: the truncation length training uses, recorded in the checkpoint for the scorers.

    ``init_model`` is anything ``rounds.models.resolve_model`` accepts (a directory, 'tiny-random', ...).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    path = resolve_model(str(init_model))
    kwargs = {"dtype": dtype if dtype is not None else torch.float32}
    if is_ppm_checkpoint(path):
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    else:
        # The causal LM checkpoint has no score.weight (new head) and an lm_head we drop: both expected,
        # so TRL's context manager silences exactly those two load warnings.
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        torch.manual_seed(seed)  # the fresh head's init
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
    tok = _load_tokenizer(path)
    _mark_as_ppm(model, tok, max_length)
    return model, tok


def load_ppm(path: str | Path, *, device: str | None = None, dtype: Any = None):
    """(model, tokenizer) of a trained PPM checkpoint, in eval mode, ready for ``ppm_scores``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    if not is_ppm_checkpoint(path):
        raise ValueError(f"{path}: not a PPM checkpoint (no config.json with {PPM_CONFIG_KEY!r}); give the ppm/ "
                         f"directory a round wrote, not a policy checkpoint")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=dtype if dtype is not None else torch.float32
    )
    if device is not None:
        model.to(device)
    model.eval()
    return model, _load_tokenizer(path)


def encode_texts(tokenizer, texts: list[str], max_length: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text (the tokenizer's usual special tokens included) and the indices of those cut.

    A text longer than ``max_length`` keeps its *last* ``max_length`` tokens: the score is read there.
    """
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"PPM text #{i} is empty (no tokens); every scored text needs at least one token")
    if max_length is None:
        return ids, []
    cut = [i for i, row in enumerate(ids) if len(row) > max_length]
    return [row[-max_length:] for row in ids], cut


def _unwrap(model):
    # DDP / accelerate wrappers keep the real model in .module; the hook goes on the real head.
    while hasattr(model, "module"):
        model = model.module
    return model


def ppm_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of a right-padded batch: tanh(head at the last attended token), shape [batch], float32.

    The forward goes through ``model`` itself (so DDP/accelerate wrappers see it and sync gradients);
    a hook on the head collects its per-token output [batch, seq, 1] before the model's own pooling.
    """
    import torch

    head = getattr(_unwrap(model), "score", None)
    if head is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no 'score' head: a PPM must be an "
                         f"AutoModelForSequenceClassification model (see rounds.ppm_model.init_ppm)")
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    per_token = captured[-1].squeeze(-1)  # [batch, seq]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)  # [batch]: index of the last attended token
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return torch.tanh(per_token[rows, last.to(per_token.device)].float())


def pad_batch(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask) tensors of shape [len(rows), longest]."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask


def ppm_scores(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """The PPM score in [-1, 1] of each text, in input order (``prompt + steps so far``, as in the pairs).

    Texts are batched by length (less padding); the model runs in eval mode and is put back in the mode
    it was in, so the trainer can call this mid-training.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if not texts:
        return []
    ids, _ = encode_texts(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    device = next(model.parameters()).device
    out = [0.0] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids, mask = pad_batch([ids[i] for i in chunk], tokenizer.pad_token_id)
                scores = ppm_rewards(model, input_ids.to(device), mask.to(device)).tolist()
                for i, s in zip(chunk, scores, strict=True):
                    out[i] = s
    finally:
        model.train(was_training)
    return out
