"""bf16 linear layers whose weights are laid out once for oneDNN, not on every call.

torch's bf16 ``Linear`` on CPU goes to oneDNN, which multiplies in a blocked weight layout of its own: given a plain
weight, every call first reorders it into that layout (a copy of the whole matrix), and a decode step's matrices
are small enough in rows that the copy costs as much as the product. ``torch.ops.mkldnn._reorder_linear_weight``
does the reorder once and ``torch.ops.mkldnn._linear_pointwise`` multiplies in it: what inductor's CPU fusion
passes emit for a compiled bf16 model, here without compiling. Measured on the development machine (2 threads,
AMX), one call, plain -> packed: 576 x 1536 at 48 rows 278 -> 186 us; the 49152 x 576 lm_head at 48 rows 11.4 ->
5.4 ms; 1.2-2.1x over the embedded model's shapes at 8-64 rows; a whole decode step of 56 rows 1.16-1.20x
(``bench/bench_generation.py`` has the engine's). Not at prefill sizes: from ~512 rows on, packed and plain
products took about the same time, at 2400 rows packed ones up to 1.4x longer, and the PPM scorer (whose forwards
are whole texts, thousands of rows) scored 1.1x slower packed, so only the policy engine packs (measured
2026-12-03, same machine).

The reorder takes a row count as a hint of the products to come; with ``PACK_ROWS`` (64) the row counts of decode
steps (1-64, and the other counts tested up to 600) gave the same bits as the plain ``Linear`` (with 1, row counts
above 32 did not): ``tests/pipeline/test_engines_packed.py`` compares whole-model logits. Not every prefill size
does: the 576 x 576 layers differ from the plain ones at 300 and 960 rows (found 2026-12-03; the 192-, 1536- and
49152-wide layers agreed at all 11 counts tried, 1-2400), so a prompt of such a length is prefilled in other last
bits than by the plain layers. Only the policy engine's inference
model is packed (``fastpath.apply`` for the bf16 path, ``TransformersPolicy`` for a model loaded in bf16): the
packed tensor is opaque (no autograd, no ``state_dict`` a checkpoint could
load), and a tied ``lm_head`` gets its own packed copy (the embedding keeps the plain one: +28M bf16 weights,
56 MB, on the embedded model).

An attention layer's q, k and v projections read the same input, so a decode step's (at most ``PACK_ROWS`` rows)
multiplies them as one packed product (``FusedQKV``): one call of 960 outputs instead of three (576 + 192 + 192) on
the embedded model, 278 -> 186 us at 56 rows. Its bits equal the three products' at 1-95 rows, not at 96 nor at most
prefill sizes (200+ rows; oneDNN blocks the wider product otherwise), so larger inputs take the three packed
products as before and no output changes (measured 2026-12-03). Those are kept beside the joint one: the q, k and
v weights twice (+33 MB on the embedded model).
"""

from __future__ import annotations

import torch

PACK_ROWS = 64


def available() -> bool:
    """oneDNN is built in and computes bf16 on this CPU (elsewhere the plain ``Linear`` stays)."""
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(torch.nn.Linear):
    """A bf16 ``nn.Linear`` for inference whose ``weight`` is oneDNN's packed copy (same shape, dtype, numel)."""

    def __init__(self, linear: torch.nn.Linear, rows: int = PACK_ROWS):
        torch.nn.Module.__init__(self)
        if linear.weight.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear packs bf16 weights, got {linear.weight.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class FusedQKV(PackedLinear):
    """A layer's q projection holding the packed product of its q, k and v projections (``weight`` is all three:
    FLOPs counted from linear layers' weights stay right) and, for inputs of more than ``PACK_ROWS`` rows, the
    three separately (``separate``). Called with ``x`` of at most ``PACK_ROWS`` rows it computes all three outputs,
    keeps them with ``x`` and returns q's; ``k_proj`` and ``v_proj`` (``ProjectionSlice``) then take theirs when
    called with that same tensor ``x`` (the attention forward passes one tensor to the three), else compute anew."""

    def __init__(self, q: torch.nn.Linear, k: torch.nn.Linear, v: torch.nn.Linear, rows: int = PACK_ROWS):
        joined = torch.nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features,
                                 bias=q.bias is not None, dtype=q.weight.dtype)
        with torch.no_grad():
            joined.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                joined.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        super().__init__(joined, rows)
        # Not submodules: the FLOPs of a token are counted once, from the joint weight.
        self.__dict__["separate"] = [PackedLinear(x, rows) for x in (q, k, v)]
        self.max_rows = PACK_ROWS  # the joint product's bits equal the three's at 1-95 rows (module docstring)
        sizes = [q.out_features, k.out_features, v.out_features]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(3)]
        self.out_features = q.out_features
        self._x = self._y = None

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x.numel() > self.max_rows * x.shape[-1]:
            return self.separate[i](x)
        if x is not self._x:
            self._x, self._y = x, super().forward(x)
        lo, hi = self.bounds[i]
        out = self._y[..., lo:hi]
        if i == 2:  # v, the last: let go of the input and the product
            self._x = self._y = None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._x = None  # q starts a new attention forward: never reuse a product across forwards
        return self.part(x, 0)


class ProjectionSlice(torch.nn.Module):
    """``k_proj`` or ``v_proj`` of a ``FusedQKV``: its slice of the joint product (no weight of its own)."""

    def __init__(self, owner: FusedQKV, index: int, linear: torch.nn.Linear):
        super().__init__()
        self.index, self.in_features, self.out_features = index, linear.in_features, linear.out_features
        self.__dict__["owner"] = owner  # not a submodule: the weight is counted, saved and moved once, with q's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.part(x, self.index)


def _fuse_qkv(model: torch.nn.Module, rows: int) -> int:
    """Every module with bf16 ``q_proj``, ``k_proj`` and ``v_proj`` ``nn.Linear`` layers of one input width and
    alike in bias gets a ``FusedQKV``; returns how many."""
    fused = 0
    for m in list(model.modules()):
        q, k, v = (getattr(m, name, None) for name in ("q_proj", "k_proj", "v_proj"))
        layers = (q, k, v)
        if not all(type(x) is torch.nn.Linear and x.weight.dtype == torch.bfloat16 for x in layers):
            continue
        if len({x.in_features for x in layers}) != 1 or len({x.bias is None for x in layers}) != 1:
            continue
        joint = FusedQKV(q, k, v, rows)
        m.q_proj, m.k_proj, m.v_proj = joint, ProjectionSlice(joint, 1, k), ProjectionSlice(joint, 2, v)
        fused += 1
    return fused


def pack_linears(model: torch.nn.Module, rows: int = PACK_ROWS) -> int:
    """Replace every bf16 ``nn.Linear`` of ``model`` (in place) by a ``PackedLinear``, an attention layer's q, k and
    v projections by one ``FusedQKV``; returns how many linear layers were replaced. Nothing is replaced where
    ``available()`` is false."""
    if not available():
        return 0
    count = 3 * _fuse_qkv(model, rows)
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16]
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(m, rows))
    return count + len(found)
