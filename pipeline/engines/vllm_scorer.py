"""PPM scoring on vLLM's pooling runner, for GPU runs where the PPM's architecture is supported.

The PPM checkpoint is an ordinary ``*ForSequenceClassification`` directory (``rounds.ppm_model``); vLLM
loads it with ``runner="pooling"``, pools the last token and returns the raw head output when asked for
no activation. The tanh is applied here, so the score is the same function as in training:
``tanh(head(last token))``. Token ids come from ``rounds.ppm_model.encode_texts`` (the same ids the
transformers scorer and training use), so vLLM's own tokenization never enters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mcts.protocols import SearchState
from pipeline.engines.config import VllmConfig
from pipeline.engines.prompts import PromptBuilder


class VllmScorer:
    """``mcts.protocols.Scorer`` on a PPM checkpoint served by ``vllm.LLM(runner="pooling")``."""

    def __init__(self, ppm_path: str | Path, *, few_shot: bool = False, n_examples: int = 1,
                 cfg: VllmConfig | None = None, dtype: str = "auto", max_length: int | None = None,
                 examples: str = "arithmetic"):
        from transformers import AutoTokenizer

        from pipeline.engines.common import import_vllm
        from rounds.ppm_model import checkpoint_max_length, is_ppm_checkpoint

        vllm = import_vllm()

        if not is_ppm_checkpoint(ppm_path):
            raise ValueError(f"{ppm_path}: not a PPM checkpoint (see rounds.ppm_model); give a round's ppm/ dir")
        cfg = cfg or VllmConfig()
        self.tokenizer = AutoTokenizer.from_pretrained(str(ppm_path))
        self.builder = PromptBuilder(self.tokenizer, few_shot=few_shot, n_examples=n_examples, examples=examples)
        # None: the length the PPM was trained with (recorded in its checkpoint), so both read the same text.
        self.max_length = max_length or checkpoint_max_length(ppm_path)
        self.llm = vllm.LLM(
            model=str(ppm_path), runner="pooling", tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, dtype=dtype,
        )

    def texts(self, states: Sequence[SearchState]) -> list[str]:
        return [self.builder.build(s.question, s.history) for s in states]

    def score(self, states: Sequence[SearchState]) -> list[float]:
        from vllm import PoolingParams

        from rounds.ppm_model import encode_texts

        if not states:
            return []
        ids, _ = encode_texts(self.tokenizer, self.texts(states), self.max_length)
        outs = self.llm.classify([{"prompt_token_ids": row} for row in ids],
                                 pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [math.tanh(o.outputs.probs[0]) for o in outs]
