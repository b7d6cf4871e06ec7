"""The CPU's fast paths for the transformers policy: bf16 weights, int8 dynamic quantization, chosen by a probe.

A CPU engine decodes at most a few hundred tokens a second, and which numeric format is fastest depends on
the CPU: bf16 halves the bytes read per token and runs on the AVX-512 BF16 / AMX units where they exist
(and is slow, emulated, where not); int8 dynamic quantization of the linear layers (``torch.ao``) runs the
matmuls on VNNI with a quarter of the weight bytes, at the cost of quantizing every activation.

``choose`` under 'auto' probes at engine start: each path decodes a fixed prompt greedily (``_GREEDY_TOKENS``
tokens) and times decode steps at the engine's batch size (rounds interleaved across paths, best of
``_PROBE_STEPS``). The pick is the highest tokens/s among the paths whose greedy tokens equal fp32's, so a
path that changes the text (int8 did on every prompt of bench_generation's check) is never picked; fp32 is
the reference and always qualifies. The decision is cached per machine and architecture
(``pipeline.engines.probe_cache``), so reruns on one machine decode alike however loaded it is at their start;
``OPEN_RSTAR_REPROBE=1`` measures again. The greedy check, though, belongs to the weights: a cached pick is used
on another checkpoint only after that checkpoint's greedy text on it equals fp32's (checked once per checkpoint,
remembered in the cache); when it differs, the next fastest cached path that agrees is used (fp32 at worst).
``engines.cpu_fast_path`` names a path instead ('int8' included).

torch.compile is not a candidate (measured 2026-12-01, README "Generation at the machine's limit"): compiling the
model's forward (inductor, dynamic shapes) made bf16 decode steps at ~48 rows 1.2-1.45x faster, but took 5.2-5.4
minutes per engine start on the 2-core machine, warm inductor cache or not; an engine here decodes 1-3 minutes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from pipeline.engines.probe_cache import ProbeCache

FAST_PATHS = ("fp32", "bf16", "int8")
_PROBE_CONTEXT = 128  # tokens of context the probe decodes on
_PROBE_STEPS = 2  # decode steps per timing round (the first of a new shape sets oneDNN up; best-of drops it)
_PROBE_ROUNDS = 3  # rounds over all paths (best of rounds x steps per path)
_GREEDY_TOKENS = 8  # greedy tokens compared with fp32's


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


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def apply(model, path: str, pack: bool = True):
    """``model`` (fp32, on CPU, eval) converted to ``path``; fp32 returns it unchanged. bf16 converts a copy and,
    with ``pack``, lays its linear layers' weights out once for oneDNN (``packed.pack_linears``: same outputs,
    faster). int8 quantizes a copy's ``nn.Linear`` layers (weights int8 per channel, activations quantized per
    call) and leaves it in fp32 otherwise."""
    import torch

    if path == "fp32":
        return model
    if path == "bf16":
        converted = copy.deepcopy(model).to(torch.bfloat16)
        if pack:
            from pipeline.engines.packed import pack_linears

            pack_linears(converted)
        return converted
    if path == "int8":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice: the API still works and is what we need
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    raise ValueError(f"cpu_fast_path={path!r}: must be one of auto, {', '.join(FAST_PATHS)}")


@dataclass(frozen=True)
class Probe:
    """What decided the engine's path: ``source`` 'named' (the config named it), 'probe' (measured now) or
    'cache' (a probe's earlier decision on this machine, numbers as measured then)."""

    chosen: str
    source: str = "named"
    tok_per_s: dict[str, float] = field(default_factory=dict)  # decode tokens/s at the probe's batch size
    agrees: dict[str, bool] = field(default_factory=dict)  # greedy tokens equal fp32's on the probe prompt
    note: str = ""  # why the cache was not used, when it was not

    def summary(self) -> str:
        if self.source == "named":
            return f"cpu fast path {self.chosen} (named in engines.cpu_fast_path)"
        rates = ", ".join(f"{k} {self.tok_per_s[k]:.0f} tok/s{'' if self.agrees.get(k) else ' (greedy differs from fp32)'}"
                          for k in FAST_PATHS if k in self.tok_per_s)
        note = f"; {self.note}" if self.note else ""
        return f"cpu fast path {self.chosen} (from {self.source}: {rates}{note})"


def pick(tok_per_s: dict[str, float], agrees: dict[str, bool]) -> str:
    """The fastest path whose greedy output agrees with fp32's; fp32 (the reference) when none is faster.
    Ties go to the earlier path of ``FAST_PATHS``."""
    ok = [p for p in FAST_PATHS if p in tok_per_s and (p == "fp32" or agrees.get(p, False))]
    if "fp32" not in ok:
        raise ValueError(f"probe has no fp32 timing ({sorted(tok_per_s)}): fp32 is the reference every probe runs")
    return max(ok, key=lambda p: (tok_per_s[p], -FAST_PATHS.index(p)))


def decode_context(model, rows: int, context: int = _PROBE_CONTEXT):
    """A KV cache of ``rows`` rows over ``context`` tokens: what ``time_decode_step`` decodes on."""
    import torch

    from pipeline.engines.kv_cache import cache_kwargs, growing_cache

    with torch.inference_mode():
        cache = growing_cache(model.config)
        ids = torch.arange(10, 10 + context).unsqueeze(0) % model.config.vocab_size
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(rows)
    return cache


def time_decode_step(model, rows: int, context: int = _PROBE_CONTEXT, steps: int = _PROBE_STEPS,
                     cache=None) -> float:
    """Seconds of one decode step of ``rows`` rows over ``context`` tokens of KV (best of ``steps``). A
    ``cache`` from ``decode_context`` is decoded on (it grows by ``steps`` tokens), else a new one is made."""
    import torch

    from pipeline.engines.kv_cache import cache_kwargs

    cache = decode_context(model, rows, context) if cache is None else cache
    best = float("inf")
    tok = torch.full((rows, 1), 11)
    with torch.inference_mode():
        for _ in range(steps):
            pos = torch.full((rows, 1), cache.get_seq_length())
            t0 = time.perf_counter()
            model(input_ids=tok, position_ids=pos, **cache_kwargs(model, cache), use_cache=True)
            best = min(best, time.perf_counter() - t0)
    return best


def greedy_tokens(model, prompt_ids: list[int], n: int = _GREEDY_TOKENS) -> list[int]:
    """``n`` greedy tokens after ``prompt_ids`` (batch 1): what the probe compares with fp32's."""
    import torch

    from pipeline.engines.kv_cache import cache_kwargs, growing_cache

    out: list[int] = []
    with torch.inference_mode():
        cache = growing_cache(model.config)
        logits = model(input_ids=torch.tensor([prompt_ids]), **cache_kwargs(model, cache), use_cache=True,
                       logits_to_keep=1).logits
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = model(input_ids=torch.tensor([[tok]]), **cache_kwargs(model, cache), use_cache=True).logits
    return out


def measure(model, rows: int, prompt_ids: list[int], paths: tuple[str, ...] = FAST_PATHS, pack: bool = True):
    """({path: model on it}, tokens/s per path at ``rows`` rows, greedy agreement with fp32 per path).
    Timing rounds alternate between the paths, so a load change during the probe touches them alike."""
    models = {p: apply(model, p, pack) for p in paths}
    ref = greedy_tokens(models["fp32"], prompt_ids)
    agrees = {p: p == "fp32" or greedy_tokens(m, prompt_ids) == ref for p, m in models.items()}
    caches = {p: decode_context(m, rows) for p, m in models.items()}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(_PROBE_ROUNDS):
        for p, m in models.items():
            best[p] = min(best[p], time_decode_step(m, rows, steps=_PROBE_STEPS, cache=caches[p]))
    return models, {p: rows / s for p, s in best.items()}, agrees


def _from_cache(model, hit: dict, prompt_ids: list[int], checked: dict[str, bool],
                pack: bool = True) -> tuple[object, str, dict, str]:
    """(model, path, agreement on this checkpoint, note) for a cache hit: the cached pick when this checkpoint's
    greedy text on it equals fp32's, else the next fastest cached path that agrees (never a faster one: those
    changed the text when probed). ``checked`` holds earlier checks of this checkpoint and gains the new ones."""
    rates = hit.get("tok_per_s", {})
    order = sorted((p for p in FAST_PATHS if p in rates), key=lambda p: (-rates[p], FAST_PATHS.index(p)))
    start = order.index(hit["chosen"]) if hit["chosen"] in order else 0
    ref: list[int] | None = None
    for path in order[start:]:
        if path == "fp32":
            break
        converted = None
        if path not in checked:
            converted = apply(model, path, pack)
            ref = greedy_tokens(model, prompt_ids) if ref is None else ref
            checked[path] = greedy_tokens(converted, prompt_ids) == ref
        if checked[path]:
            note = "" if path == hit["chosen"] else (f"{hit['chosen']} changes this checkpoint's greedy text: "
                                                     f"{path} is the fastest that keeps it")
            return converted if converted is not None else apply(model, path, pack), path, checked, note
    note = "" if hit["chosen"] == "fp32" else f"{hit['chosen']} changes this checkpoint's greedy text: fp32"
    return model, "fp32", checked, note


def choose(model, requested: str, rows: int, prompt_ids: list[int], cache: ProbeCache | None = None,
           reprobe: bool = False, weights: str = "", pack: bool = True) -> tuple[object, Probe]:
    """(the model on the chosen path, the record of why). ``requested`` 'auto': the cached decision for this
    machine and model when ``cache`` holds one (and not ``reprobe``), its greedy check redone on these weights
    (``weights``: ``probe_cache.weights_id``; '' checks every time), else ``measure`` and ``pick``, stored in
    ``cache``. ``prompt_ids``: the fixed prompt of the greedy check. ``pack``: see ``apply``."""
    if requested != "auto":
        return apply(model, requested, pack), Probe(requested)
    import torch

    from pipeline.engines.probe_cache import machine_key

    if cache is None:
        models, rates, agrees = measure(model, rows, prompt_ids, pack=pack)
        chosen = pick(rates, agrees)
        return models[chosen], Probe(chosen, "probe", rates, agrees, "no cache")
    key = machine_key(model, torch.get_num_threads(), rows, prompt_ids, cpu_flags())
    note = "re-probe asked (OPEN_RSTAR_REPROBE)" if reprobe else ""
    try:
        with cache.locked():
            if not reprobe:
                try:
                    hit = cache.lookup(key)
                except ValueError as e:
                    hit, note = None, f"cache unreadable, replaced: {e}"
                if hit is not None and hit.get("chosen") in FAST_PATHS:
                    known = dict(hit.get("checked", {}).get(weights, {})) if weights else {}
                    converted, chosen, here, why = _from_cache(model, hit, prompt_ids, dict(known), pack)
                    if weights and here != known:
                        cache.record_check(key, weights, here)
                    note = f"probed {hit.get('probed_at')}" + (f"; {why}" if why else "")
                    return converted, Probe(chosen, "cache", hit.get("tok_per_s", {}), {**hit.get("agrees", {}),
                                                                                        **here}, note)
            models, rates, agrees = measure(model, rows, prompt_ids, pack=pack)
            chosen = pick(rates, agrees)
            cache.store(key, {"chosen": chosen, "tok_per_s": rates, "agrees": agrees,
                              **({"checked": {weights: agrees}} if weights else {})})
    except OSError as e:  # a read-only or full cache directory: the engine still starts, on a fresh probe
        models, rates, agrees = measure(model, rows, prompt_ids, pack=pack)
        chosen = pick(rates, agrees)
        return models[chosen], Probe(chosen, "probe", rates, agrees, f"not cached: {cache.dir} unusable ({e})")
    return models[chosen], Probe(chosen, "probe", rates, agrees, note or f"stored in {cache.path}")
