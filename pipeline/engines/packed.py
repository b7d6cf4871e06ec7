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


def pack_linears(model: torch.nn.Module, rows: int = PACK_ROWS) -> int:
    """Replace every bf16 ``nn.Linear`` of ``model`` (in place) by a ``PackedLinear``; returns how many. Nothing is
    replaced where ``available()`` is false."""
    if not available():
        return 0
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16]
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(m, rows))
    return len(found)
