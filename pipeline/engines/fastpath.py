"""The CPU's fast paths for the transformers policy: bf16 weights, int8 dynamic quantization, chosen by CPU flags.

A CPU engine decodes at most a few hundred tokens a second, and which numeric format is fastest depends on
the CPU: bf16 halves the bytes read per token and runs on the AVX-512 BF16 / AMX units where they exist
(and is slow, emulated, where not); int8 dynamic quantization of the linear layers (``torch.ao``) runs the
matmuls on VNNI with a quarter of the weight bytes, at the cost of quantizing every activation.

``choose`` under 'auto' picks bf16 where the CPU computes it natively and fp32 elsewhere: a rule on the
CPU's flags, not on a timing, so that the same config on the same machine always decodes with the same
numbers (a timing probe picked differently from run to run on a loaded machine, and a resumed run then
sampled other text than the run it resumed). It still times one decode step of each candidate at the
engine's batch size and records it, so the log shows whether the rule paid off on this CPU
(``engines.cpu_fast_path`` names a path instead; 'int8' is used only when named). torch.compile is not a
candidate: not measured.
The numeric differences are not free: ``bench/bench_generation.py`` measures how often greedy outputs of
each path agree with fp32 on a fixed prompt set, and the README states it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

FAST_PATHS = ("fp32", "bf16", "int8")
_PROBE_CONTEXT = 128  # tokens of context the probe decodes on
_PROBE_STEPS = 3


def torch_float32():
    import torch

    return torch.float32


def linear_flops(model) -> int:
    """2 FLOPs per linear-layer weight (a tied lm_head included): the matmul work of one decoded token."""
    import torch

    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """The CPU computes in bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def candidates() -> tuple[str, ...]:
    """The fast paths 'auto' probes on this CPU. int8 is not among them: it changed the greedy text of every
    prompt of bench_generation's agreement check (0/4 identical to fp32 over 16 tokens; bf16: 4/4), so it
    is used only when named."""
    return ("fp32", "bf16") if native_bf16() else ("fp32",)


def apply(model, path: str):
    """``model`` (fp32, on CPU, eval) converted to ``path``; fp32 returns it unchanged. int8 quantizes a copy's
    ``nn.Linear`` layers (weights int8 per channel, activations quantized per call) and leaves it in fp32 otherwise."""
    import torch

    if path == "fp32":
        return model
    if path == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if path == "int8":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice: the API still works and is what we need
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    raise ValueError(f"cpu_fast_path={path!r}: must be one of auto, {', '.join(FAST_PATHS)}")


@dataclass(frozen=True)
class Probe:
    chosen: str
    ms_per_step: dict[str, float]  # one decode step at the probe's batch size, best of a few

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.0f} ms" for k, v in self.ms_per_step.items())
        return f"cpu fast path {self.chosen} (decode step at probe batch: {times})"


def time_decode_step(model, rows: int, context: int = _PROBE_CONTEXT, steps: int = _PROBE_STEPS) -> float:
    """Seconds of one decode step of ``rows`` rows over ``context`` tokens of KV (best of ``steps``)."""
    import torch

    from pipeline.engines.kv_cache import growing_cache

    with torch.inference_mode():
        cache = growing_cache(model.config)
        ids = torch.arange(10, 10 + context).unsqueeze(0) % model.config.vocab_size
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(rows)
        best = float("inf")
        tok = torch.full((rows, 1), 11)
        for i in range(steps):
            pos = torch.full((rows, 1), context + i)
            t0 = time.perf_counter()
            model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
            best = min(best, time.perf_counter() - t0)
    return best


def choose(model, requested: str, rows: int) -> tuple[object, Probe]:
    """(the model on the chosen path, the probe's record). ``requested`` 'auto': the last of ``candidates()``
    (bf16 where native, else fp32), every candidate timed for the record."""
    if requested != "auto":
        return apply(model, requested), Probe(requested, {})
    timings: dict[str, float] = {}
    models: dict[str, object] = {}
    for path in candidates():
        models[path] = apply(model, path)
        timings[path] = time_decode_step(models[path], rows) * 1000
    chosen = candidates()[-1]
    return models[chosen], Probe(chosen, timings)
