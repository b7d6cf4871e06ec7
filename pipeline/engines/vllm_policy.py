"""The vLLM policy backends: offline ``vllm.LLM`` (one batch per MCTS wave) and ``AsyncLLM`` (trees advance
independently). vLLM is imported only when one of these is constructed.

Prompts go in as token ids tokenized here without special tokens: the chat template already wrote them,
and letting vLLM tokenize the text would add a second BOS for templates that start with one. Prefix
caching is on by default: every prompt starts with the same instruction, a tree's prompts share the
question and earlier steps, and the k samples of one state share everything (``n=k``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from mcts.protocols import Proposal, SearchState
from pipeline.engines.common import GenStats, import_vllm, prefix_order, stop_strings
from pipeline.engines.config import GenerationConfig, VllmConfig
from pipeline.engines.prompts import PromptBuilder


def engine_kwargs(model_path: str | Path, cfg: VllmConfig, dtype: str, seed: int) -> dict:
    """Arguments shared by ``vllm.LLM`` and ``AsyncEngineArgs``."""
    return {
        "model": str(model_path),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": cfg.max_model_len,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "enforce_eager": cfg.enforce_eager,
        "dtype": dtype,
        "seed": seed,
    }


class _VllmBase:
    def __init__(self, builder: PromptBuilder, gen: GenerationConfig, mode: str):
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.gen = gen
        self.mode = mode
        self.stops = stop_strings(mode)
        # Calls, prompt / cached / generated tokens: vLLM's prefix-cache hit rate is stats.prefix_hit_rate.
        self.stats = GenStats()

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens whose KV came from vLLM's prefix cache, over this engine's requests."""
        return self.stats.prefix_hit_rate

    def _count(self, prompt: dict, request_output) -> None:
        self.stats.prompt_tokens += len(prompt["prompt_token_ids"])
        self.stats.reused_tokens += int(getattr(request_output, "num_cached_tokens", 0) or 0)
        self.stats.new_tokens += sum(len(c.token_ids) for c in request_output.outputs)

    def _prompt(self, state: SearchState) -> dict:
        text = self.builder.build(state.question, state.history)
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def _params(self, k: int, seed: int, **extra):
        from vllm import SamplingParams

        greedy = self.gen.temperature == 0.0
        # Greedy samples are all the same text: ask for one and repeat it (vLLM rejects n>1 greedy in places).
        return SamplingParams(
            n=1 if greedy else k, temperature=self.gen.temperature, top_p=1.0 if greedy else self.gen.top_p,
            max_tokens=self.gen.max_new_tokens(self.mode), stop=list(self.stops), seed=seed, **extra,
        )

    def _proposals(self, request_output, k: int) -> list[Proposal]:
        out = []
        for c in request_output.outputs:
            # stop_reason: the matched stop string, a stop token id (int), or None (EOS / length).
            stop = c.stop_reason if isinstance(c.stop_reason, str) and c.stop_reason in self.stops else None
            out.append(Proposal(text=c.text, stop=stop))
        return out * k if len(out) == 1 and k > 1 else out


class VllmPolicy(_VllmBase):
    """``mcts.protocols.Policy`` on offline ``vllm.LLM``: one ``generate`` call per wave of states."""

    def __init__(self, model_path: str | Path, builder: PromptBuilder, gen: GenerationConfig, mode: str = "step",
                 *, cfg: VllmConfig | None = None, dtype: str = "auto", seed: int = 0):
        vllm = import_vllm()
        super().__init__(builder, gen, mode)
        self.llm = vllm.LLM(**engine_kwargs(model_path, cfg or VllmConfig(), dtype, seed))

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now (otherwise they live until the ``LLM`` is collected)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        if not states:
            return []
        t0 = time.perf_counter()
        prompts = [self._prompt(s) for s in states]
        # Requests sharing a prefix go in side by side: the first computes it, the rest hit the cache.
        order = prefix_order([p["prompt_token_ids"] for p in prompts])
        outputs = self.llm.generate([prompts[i] for i in order], [self._params(k, states[i].seed) for i in order],
                                    use_tqdm=False)
        out: list[list[Proposal]] = [[] for _ in states]
        for i, o in zip(order, outputs, strict=True):
            out[i] = self._proposals(o, k)
            self._count(prompts[i], o)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return out


class AsyncVllmPolicy(_VllmBase):
    """vLLM's ``AsyncLLM`` on an event loop of its own (a daemon thread), so synchronous callers such as a
    Ray actor can ``submit`` one state at a time and collect each tree's proposals as soon as they are done,
    while vLLM batches whatever is in flight. ``propose`` is the blocking protocol method on top; callers on
    several threads may call it at once (an engine actor serving several tree groups), and vLLM batches their
    requests together."""

    concurrent_calls = True  # pipeline.actors.PolicyEngine then serves its callers concurrently

    def __init__(self, model_path: str | Path, builder: PromptBuilder, gen: GenerationConfig, mode: str = "step",
                 *, cfg: VllmConfig | None = None, dtype: str = "auto", seed: int = 0):
        import_vllm()
        super().__init__(builder, gen, mode)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async-loop", daemon=True)
        self._thread.start()
        kwargs = engine_kwargs(model_path, cfg or VllmConfig(), dtype, seed)
        self.engine = asyncio.run_coroutine_threadsafe(self._make_engine(kwargs), self._loop).result()
        self._calls_lock = threading.Lock()  # propose's callers count calls and seconds from their own threads

    @staticmethod
    async def _make_engine(kwargs: dict):
        from vllm import AsyncEngineArgs

        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # older vLLM: the V0 engine under its public name
            from vllm import AsyncLLMEngine as AsyncLLM
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def agenerate(self, state: SearchState, k: int, prompt: dict | None = None) -> list[Proposal]:
        """``state``'s ``k`` proposals; ``prompt``: its ``_prompt`` when the caller built it already."""
        from vllm.sampling_params import RequestOutputKind

        params = self._params(k, state.seed, output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = prompt or self._prompt(state)
        final = None
        async for out in self.engine.generate(prompt, params, f"{state.tree_id}-{uuid.uuid4().hex}"):
            final = out
        if final is None:
            raise RuntimeError(f"vLLM returned no output for tree {state.tree_id}")
        self._count(prompt, final)  # on the event loop's one thread
        return self._proposals(final, k)

    def submit(self, state: SearchState, k: int, prompt: dict | None = None) -> Future:
        """Start one state's generation; the future resolves to its ``k`` proposals."""
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        return asyncio.run_coroutine_threadsafe(self.agenerate(state, k, prompt), self._loop)

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        t0 = time.perf_counter()
        prompts = [self._prompt(s) for s in states]
        # Submitted in prefix order, as the offline engine sends them: neighbours share their prefix's cache.
        order = prefix_order([p["prompt_token_ids"] for p in prompts])
        futures = {i: self.submit(states[i], k, prompts[i]) for i in order}
        out = [futures[i].result() for i in range(len(states))]
        with self._calls_lock:
            self.stats.calls += 1
            self.stats.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
