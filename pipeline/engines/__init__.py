"""Engines: policy generation and PPM scoring behind ``mcts.protocols.Policy`` / ``Scorer``.

    policy = make_policy(cfg.engines, mode=spec.gen_mode, few_shot=spec.few_shot, model=policy_dir)
    scorer = make_scorer(cfg.engines, ppm_dir)

Backends are registry entries (``POLICY_BACKENDS``); each imports its heavy library (torch, vLLM,
requests) only when built, so importing this package stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from mcts.protocols import Policy, Scorer
from pipeline.engines.common import EngineError
from pipeline.engines.config import EngineConfig, GenerationConfig, HttpConfig, VllmConfig
from pipeline.engines.prompts import PromptBuilder


def prompt_builder(model: str | Path, few_shot: bool = False, n_examples: int = 1,
                   cache_dir: Path | None = None, examples: str = "arithmetic") -> PromptBuilder:
    """The prompt builder of a model spec or checkpoint directory (its tokenizer's chat template)."""
    from rounds.models import load_tokenizer

    return PromptBuilder(load_tokenizer(model, cache_dir), few_shot=few_shot, n_examples=n_examples,
                         examples=examples)


def _cpu_threads(cfg: EngineConfig) -> None:
    """Give a CPU engine all its cores (Ray sets OMP_NUM_THREADS=1 in actors with fractional CPUs)."""
    import os

    import torch

    torch.set_num_threads(cfg.cpu_threads or len(os.sched_getaffinity(0)))


def _transformers(cfg: EngineConfig, path: Path, builder: PromptBuilder, mode: str, seed: int) -> Policy:
    from pipeline.engines import compute
    from pipeline.engines.hf_policy import TransformersPolicy

    def build() -> Policy:  # on the compute thread: the fast-path probe's forwards are compute too
        _cpu_threads(cfg)
        return TransformersPolicy(path, builder, cfg.generation, mode, device=cfg.device, dtype=cfg.dtype,
                                  max_batch_rows=cfg.max_batch_rows, cpu_fast_path=cfg.cpu_fast_path,
                                  prefix_cache_mb=cfg.prefix_cache_mb,
                                  shared_prefix_attention=cfg.shared_prefix_attention,
                                  group_attention=cfg.group_attention, fused_admission=cfg.fused_admission,
                                  packed_linears=cfg.packed_linears, fused_kernels=cfg.fused_kernels,
                                  fused_attention=cfg.fused_attention)

    return compute.run(build)


def _vllm(cfg: EngineConfig, path: Path, builder: PromptBuilder, mode: str, seed: int) -> Policy:
    from pipeline.engines.vllm_policy import VllmPolicy

    return VllmPolicy(path, builder, cfg.generation, mode, cfg=cfg.vllm, dtype=cfg.dtype, seed=seed)


def _vllm_async(cfg: EngineConfig, path: Path, builder: PromptBuilder, mode: str, seed: int) -> Policy:
    from pipeline.engines.vllm_policy import AsyncVllmPolicy

    return AsyncVllmPolicy(path, builder, cfg.generation, mode, cfg=cfg.vllm, dtype=cfg.dtype, seed=seed)


def _http(cfg: EngineConfig, path: Path, builder: PromptBuilder, mode: str, seed: int) -> Policy:
    from pipeline.engines.http_policy import HttpPolicy

    return HttpPolicy(cfg.http, str(path), builder, cfg.generation, mode)


POLICY_BACKENDS: dict[str, Callable[..., Policy]] = {
    "transformers": _transformers,
    "vllm": _vllm,
    "vllm_async": _vllm_async,
    "http": _http,
}


def make_policy(cfg: EngineConfig, *, model: str | Path | None = None, mode: str = "step", few_shot: bool = False,
                seed: int = 0, cache_dir: Path | None = None) -> Policy:
    """The configured policy backend on ``model`` (a spec or checkpoint dir; default ``cfg.policy_model``).

    ``mode`` and ``few_shot`` come from the round (``RoundSpec.gen_mode`` / ``few_shot``); ``seed`` seeds
    the engine itself (vLLM); per-sample seeds come from each ``SearchState.seed``.
    """
    from rounds.models import resolve_model

    if cfg.backend not in POLICY_BACKENDS:
        raise ValueError(f"engines.backend={cfg.backend!r}: must be one of {', '.join(POLICY_BACKENDS)}")
    path = resolve_model(str(model if model is not None else cfg.policy_model), cache_dir)
    builder = prompt_builder(path, few_shot=few_shot, n_examples=cfg.few_shot_examples, cache_dir=cache_dir,
                             examples=cfg.examples)
    return POLICY_BACKENDS[cfg.backend](cfg, path, builder, mode, seed)


def with_generation(policy: Policy, gen: GenerationConfig) -> Policy:
    """A view of ``policy`` that decodes with ``gen`` and shares everything else: the loaded model, the vLLM
    engine or the HTTP session. Evaluation decodes greedily and by sampling from one model this way; two
    ``make_policy`` calls would load it twice (two vLLM engines on one GPU do not fit).
    """
    if not hasattr(policy, "gen"):
        raise TypeError(f"{type(policy).__name__} has no generation settings (.gen) to replace")
    view = copy.copy(policy)
    view.gen = gen  # type: ignore[attr-defined]
    return view


def make_scorer(cfg: EngineConfig, ppm_path: str | Path, *, few_shot: bool = False) -> Scorer:
    """The PPM scorer on a trained PPM checkpoint directory (``cfg.ppm_backend``; transformers on ``cfg.device``).

    ``few_shot`` must match the prompts the PPM pairs were exported with (normally off). The truncation length
    is the one the PPM was trained with (``training.ppm.max_length``, recorded in the checkpoint).
    """
    if cfg.ppm_backend == "vllm":
        from pipeline.engines.vllm_scorer import VllmScorer

        return VllmScorer(ppm_path, few_shot=few_shot, n_examples=cfg.few_shot_examples, cfg=cfg.vllm,
                          dtype=cfg.dtype, examples=cfg.examples)
    from pipeline.engines import compute
    from pipeline.engines.scorer import TransformersScorer

    def build() -> Scorer:
        _cpu_threads(cfg)
        return TransformersScorer(ppm_path, few_shot=few_shot, n_examples=cfg.few_shot_examples, device=cfg.device,
                                  dtype=cfg.dtype, batch_size=cfg.ppm_batch_size, examples=cfg.examples)

    return compute.run(build)


__all__ = ["EngineConfig", "GenerationConfig", "HttpConfig", "VllmConfig", "EngineError", "PromptBuilder",
           "POLICY_BACKENDS", "make_policy", "make_scorer", "prompt_builder", "with_generation"]
