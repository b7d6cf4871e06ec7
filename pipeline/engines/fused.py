"""A bf16 Llama decoder step with its small kernels fused (RMSNorm, the residual add before it, RoPE), and decode
attention over each row's own cache in C.

A batch-64 decode step of the embedded model is ~3,300 torch ops, ~3,100 of them small: each of a layer's two
RMSNorms is eight (cast, pow, mean, add, rsqrt, mul, cast, mul), RoPE fourteen (per q and k: two slices, neg, cat,
two muls, add), and each costs 10-20 us of dispatch and memory traffic on a 64 x 576 bf16 tensor on this CPU, more
than its arithmetic (README, "What holds a batch-64 decode step below 60% of the roofline"). Here each becomes one
call into a small C library (``fused_kernels.c``): a norm, a residual add + norm, and RoPE over q and k at once.
The kernels round to bf16 where transformers' eager code rounds, and the norm adds its squares in the order
torch's CPU sum kernel does (8-lane vectors, four accumulators; found at load time, ``Kernels._sum_lanes``), so a
fused model computes transformers' bits (``tests/pipeline/test_engines_fused.py`` compares whole-model logits at
decode and prefill sizes): the same text, sooner. The MLP's SiLU x product stays torch's: one thread of plain C
took 2x torch's two threads on 64 x 1536 (measured 2026-12-03).

Decode attention (``engines.fused_attention``): in a decode step each row's queries attend to the shared prefix
(torch's flash kernel, one call for all rows) and to the row's own cache (``cascade.attention``). For the latter
torch's flash kernel ran at about a third of the memory bandwidth on this CPU (it tiles for long query blocks; here
a row has one query per head); ``Kernels.decode_attention`` takes each (row, kv head) as one task: AVX-512 BF16 dot
products for the scores, an fp32 softmax, the values summed in fp32, the row's left-padding columns skipped
unread, the tasks shared among torch's own OpenMP threads. ~2x flash's speed at 64-600 columns (measured
2026-12-03), fp32 output within 2e-6 of an fp32 softmax over the same bf16 inputs (flash rounds its output to bf16),
so not flash's bits: sampled text can differ from the flash engine's where bf16 rounding decided a token.

The library is plain C (no torch headers), compiled with the system's C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) for this CPU (``-march=native``) on first use, about a second, and kept in the cache directory
(``$XDG_CACHE_HOME/open-rstar/kernels``) under a name hashing the source, the flags, the compiler and the CPU's
flags; later engines load it. Where no compiler works, or the CPU is not x86-64, the model keeps transformers'
code and the engine says why. ``engines.fused_kernels: false`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_kernels.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-math-errno", "-shared",
         "-fPIC", "-Wno-unknown-pragmas")
# OpenMP for the attention kernel's threads: the library then needs libgomp.so.1, which the dynamic linker finds
# already loaded by torch (same soname), so the kernel runs on torch's own thread team. Without it (a compiler with
# no OpenMP) the library is built single-threaded.
OPENMP = "-fopenmp"
_loaded: dict[str, object] = {}  # library path -> Kernels, per process


class Kernels:
    """The compiled library: each method allocates its outputs and calls one C function (the GIL is released)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.rms_norm.argtypes = [p, p, p, i, i, f, i]
        lib.add_rms_norm.argtypes = [p, p, p, p, p, i, i, f, i]
        lib.rope.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
        lib.decode_attention.argtypes = [p, i, i, p, p, i, i, p, i, p, p, i, i, i, i, f]
        lib.decode_attention.restype = ctypes.c_int
        lib.decode_attention_merged.argtypes = [p, i, i, p, p, i, i, p, i, p, i, i, p, i, i, p, i, i, i, i, f]
        lib.decode_attention_merged.restype = ctypes.c_int
        self._lib = lib
        self.lanes = self._sum_lanes()
        self.attention = self._attention_works()

    def _attention_works(self) -> bool:
        """The library was built with AVX-512 BF16 (``-march=native`` on a CPU that has it): else its decode attention
        returns -3 and flash attention stays."""
        import torch

        q = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
        kv = torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16)
        return self.decode_attention(q, kv, kv, None, 0.125) is not None

    def decode_attention(self, q, k, v, mask, scale: float):
        """Attention of one query per row: ``q`` ``[b, kv_heads, g, 64]`` bf16 (each kv head's g query heads, rows of
        64 contiguous), ``k``/``v`` ``[b, kv_heads, S, 64]`` bf16 (one layout, rows contiguous), ``mask`` additive
        bf16 ``[b, 1, 1, S]`` (0 / -inf, last dim contiguous) or None. Returns (out ``[b, kv_heads, g, 64]`` fp32,
        log-sum-exp ``[b, kv_heads, g]`` fp32), or None where the kernel cannot take these inputs."""
        import torch

        if not self._takes(q, k, v, mask):
            return None
        b, kvh, g, d = q.shape
        out = torch.empty((b, kvh, g, d), dtype=torch.float32)
        lse = torch.empty((b, kvh, g), dtype=torch.float32)
        rc = self._lib.decode_attention(*self._inputs(q, k, v, mask), out.data_ptr(), lse.data_ptr(), b, kvh, g,
                                        k.shape[2], scale)
        return (out, lse) if rc == 0 else None

    def decode_attention_merged(self, q, k, v, mask, scale: float, prefix_out, prefix_lse):
        """``decode_attention`` merged with the shared prefix's part (``prefix_out`` ``[1, kv_heads, b * g, 64]`` bf16,
        head_dim contiguous, ``prefix_lse`` ``[1, kv_heads, b * g]`` fp32: flash attention of every row's queries to the prefix, as
        ``cascade.attention`` computes it): softmax attention over [prefix | own cache] in transformers' layout
        ``[b, 1, kv_heads * g, 64]`` bf16, or None where the kernel cannot take these inputs."""
        import torch

        if not self._takes(q, k, v, mask):
            return None
        b, kvh, g, d = q.shape
        if (prefix_out.dtype != torch.bfloat16 or tuple(prefix_out.shape) != (1, kvh, b * g, d)
                or prefix_out.stride(3) != 1 or prefix_lse.dtype != torch.float32
                or tuple(prefix_lse.shape) != (1, kvh, b * g)):
            return None
        merged = torch.empty((b, 1, kvh * g, d), dtype=torch.bfloat16)
        rc = self._lib.decode_attention_merged(*self._inputs(q, k, v, mask), prefix_out.data_ptr(),
                                               prefix_out.stride(1), prefix_out.stride(2), prefix_lse.data_ptr(),
                                               prefix_lse.stride(1), prefix_lse.stride(2), merged.data_ptr(), b, kvh,
                                               g, k.shape[2], scale)
        return merged if rc == 0 else None

    @staticmethod
    def _inputs(q, k, v, mask) -> tuple[int, ...]:
        """The C functions' first arguments: q, its row and head strides, k, v, their row and head strides, the mask
        (0 for none) and its row stride."""
        return (q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                0 if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0))

    @staticmethod
    def _takes(q, k, v, mask) -> bool:
        import torch

        b, kvh, g, d = q.shape
        s = k.shape[2]
        if (d != 64 or q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16
                or q.stride(3) != 1 or q.stride(2) != d or k.stride() != v.stride() or k.stride(3) != 1
                or k.stride(2) != d or tuple(v.shape) != tuple(k.shape) or k.shape[:2] != q.shape[:2]):
            return False
        return mask is None or (mask.dtype == torch.bfloat16 and tuple(mask.shape) == (b, 1, 1, s)
                                and mask.stride(3) == 1)

    def _sum_lanes(self) -> int:
        """The vector width in which this torch build's CPU ``sum`` adds (8 on this project's machines, AVX-512
        ones included: the norm must add in the same order to give the same bits), found by trying both on fixed
        random rows; 0 when neither gives torch's bits (the norms then stay transformers' own)."""
        import torch
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        g = torch.Generator().manual_seed(0)
        x = (torch.randn(64, 576, generator=g) * 3).to(torch.bfloat16)
        norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(576, generator=g))
            want = norm(x)
        for lanes in (8, 16):
            self.lanes = lanes
            if torch.equal(self.rms_norm(x, norm.weight, norm.variance_epsilon), want):
                return lanes
        return 0

    def rms_norm(self, x, weight, eps: float):
        """LlamaRMSNorm(x) for a contiguous bf16 ``x`` [..., dim]."""
        import torch

        out = torch.empty_like(x)
        self._lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps,
                           self.lanes)
        return out

    def add_rms_norm(self, a, b, weight, eps: float):
        """(a + b, LlamaRMSNorm(a + b)) for contiguous bf16 ``a``, ``b`` of one shape."""
        import torch

        total, out = torch.empty_like(a), torch.empty_like(a)
        self._lib.add_rms_norm(a.data_ptr(), b.data_ptr(), total.data_ptr(), weight.data_ptr(), out.data_ptr(),
                               a.numel() // a.shape[-1], a.shape[-1], eps, self.lanes)
        return total, out

    def rope(self, q, k, cos, sin, head_dim: int):
        """transformers' ``apply_rotary_pos_emb`` on projections laid out ``[batch, seq, heads * head_dim]``
        (contiguous, bf16) with ``cos``/``sin`` ``[batch or 1, seq, head_dim]``; returns them in that layout."""
        import torch

        tokens = q.numel() // q.shape[-1]
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        self._lib.rope(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(), ko.data_ptr(),
                       tokens, cos.numel() // head_dim, q.shape[-1] // head_dim, k.shape[-1] // head_dim, head_dim)
        return qo, ko


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` when set, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


@functools.cache
def _library_name(cc: str) -> str:
    from pipeline.engines.fastpath import cpu_flags

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join((*FLAGS, OPENMP)).encode(), cc.encode(), version.encode(),
                 " ".join(sorted(cpu_flags())).encode()):
        h.update(part)
        h.update(b"\0")
    return f"fused-{h.hexdigest()[:16]}.so"


def load(cache: Path | None = None) -> tuple[Kernels | None, str]:
    """(the kernels, '') built or found in ``cache`` (default: the engine cache's ``kernels/``), or (None, why not)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the fused kernels are built for x86-64, this CPU is {platform.machine()}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    if cache is None:
        from pipeline.engines.probe_cache import cache_dir

        cache = cache_dir() / "kernels"
    name = _library_name(cc)
    path = cache / name
    if str(path) in _loaded:
        return _loaded[str(path)], ""
    if not path.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            where = cache
        except OSError:
            where = Path(tempfile.mkdtemp(prefix="open-rstar-kernels-"))
            path = where / name
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=where)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, OPENMP, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:  # no OpenMP with this compiler: single-threaded attention
                done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                      timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            return None, f"compiling {SOURCE.name} with {cc} failed: {e}"
        if done.returncode != 0:
            os.unlink(tmp)
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"compiling {SOURCE.name} with {cc} failed (exit {done.returncode}): {' | '.join(tail)}"
        os.replace(tmp, path)  # atomic: an engine starting beside this one loads a whole file or builds its own
    try:
        kernels = Kernels(path)
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    _loaded[str(path)] = kernels
    return kernels, ""


def supported(model) -> str:
    """'' when ``fuse`` can take ``model``'s decoder layers, else why not."""
    import torch

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        return f"model type {getattr(cfg, 'model_type', None)!r} (only llama layers are fused)"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the fused MLP is SiLU's)"
    if model.dtype != torch.bfloat16:
        return f"dtype {model.dtype} (the kernels are bf16)"
    if next(model.parameters()).device.type != "cpu":
        return "not on the CPU"
    return ""


def _refusal(model, kernels: Kernels) -> str:
    """'' when ``fuse`` can route ``model`` through ``kernels``, else why not."""
    if not kernels.lanes:
        return f"{kernels.path.name}'s norm does not match this torch build's sum order"
    return supported(model)


def fuse(model, kernels: Kernels, attention: bool = True) -> int:
    """Route ``model``'s decoder layers and final norm (in place) through ``kernels``; returns the layers fused.
    With ``attention`` (and a library that has it), cascade attention's decode part (each row against its own cache,
    ``cascade.attention``) runs ``Kernels.decode_attention`` instead of flash attention.
    Inputs the kernels do not take (not bf16, not contiguous, rotary tables of another shape) go through
    transformers' own code, per call."""
    why = _refusal(model, kernels)
    if why:
        raise ValueError(f"cannot fuse this model's layers: {why}")
    inner = model.model
    for layer in inner.layers:
        layer._fused_kernels = kernels
        layer.forward = types.MethodType(_layer_forward, layer)
        if attention and kernels.attention:
            layer.self_attn._fused_kernels = kernels
    norm = inner.norm
    norm._fused_kernels = kernels
    norm.forward = types.MethodType(_norm_forward, norm)
    return len(inner.layers)


def _plain(x) -> bool:
    import torch

    return x.dtype == torch.bfloat16 and x.is_contiguous() and x.device.type == "cpu"


def _norm_forward(self, hidden_states):
    if _plain(hidden_states):
        return self._fused_kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                   position_embeddings=None, **kwargs):
    """``LlamaDecoderLayer.forward`` (transformers 5) with the norms, residual adds and RoPE fused."""
    import torch.nn.functional as F

    if "past_key_values" in kwargs:  # the argument's old name, as transformers' own layer accepts it
        cache = kwargs.pop("past_key_values")
    k = self._fused_kernels
    if not _plain(hidden_states):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    norm = self.input_layernorm
    x = k.rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    attn = _attention(self.self_attn, k, x, position_embeddings, attention_mask, cache,
                      position_ids=position_ids, use_cache=use_cache, **kwargs)
    post = self.post_attention_layernorm
    hidden_states, x = k.add_rms_norm(hidden_states, attn, post.weight, post.variance_epsilon)
    mlp = self.mlp
    act = F.silu(mlp.gate_proj(x), inplace=True).mul_(mlp.up_proj(x))  # eager's bits, without two allocations
    return hidden_states + mlp.down_proj(act)


def _attention(self, k, x, position_embeddings, attention_mask, cache, **kwargs):
    """``LlamaAttention.forward`` with RoPE fused; returns the o_proj output."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    input_shape = x.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, key = self.q_proj(x), self.k_proj(x)
    value = self.v_proj(x).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    tables = cos.shape[:-1] == input_shape or (cos.shape[0] == 1 and cos.shape[1:-1] == input_shape[1:])
    if tables and cos.shape == sin.shape and len(input_shape) == 2 and all(map(_plain, (cos, sin, q, key))):
        q, key = k.rope(q, key, cos, sin, self.head_dim)
        q, key = q.view(hidden_shape).transpose(1, 2), key.view(hidden_shape).transpose(1, 2)
    else:
        q, key = apply_rotary_pos_emb(q.view(hidden_shape).transpose(1, 2), key.view(hidden_shape).transpose(1, 2),
                                      cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, _ = interface(self, q, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous())


def install(model, attention: bool = True) -> str:
    """Fuse ``model``'s layers when it and this machine allow (``attention``: see ``fuse``): a line for the engine's
    log saying what was done."""
    why = supported(model)  # before load(): a model that cannot be fused need not build the library
    if not why:
        kernels, why = load()
        why = why or _refusal(model, kernels)
        if not why:
            n = fuse(model, kernels, attention)
            what = ("decode attention too" if attention and kernels.attention else
                    "decode attention: flash" + ("" if not attention else " (the CPU lacks AVX-512 BF16)"))
            return f"fused kernels on ({n} layers, {what}; {kernels.path})"
    return f"fused kernels off: {why}"


if __name__ == "__main__":  # python -m pipeline.engines.fused: build (or find) the library and say where
    found, reason = load()
    print(found.path if found else reason)
    sys.exit(0 if found else 1)
