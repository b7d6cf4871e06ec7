"""Row-independent fp32 matrix products on CPU: a request's tokens must not depend on what else is batched.

Continuous batching promises that a request decodes exactly what its seed gives alone (README, "Generation at
the machine's limit"). That holds only if every row of a linear layer's output is computed the same way
whatever the number of rows. MKL's sgemm (torch's fp32 ``Linear`` on CPU) picks its kernel by the shape: on
this development machine (Xeon with AVX-512 and AMX, torch 2.13 with MKL 2024.2) a row's output came out
bit-identical only within the row-count classes {1}, {2..13}, {16..64}, so a row decoded next to 5 others
differed in its last bits from the same row alone, and on a nearly flat next-token distribution (the
tiny-random model) the sampled text changed. MKL's conditional numerical reproducibility in strict mode
(``MKL_CBWR=AUTO,STRICT``) makes every row count give the same bits; measured there, a 576 x 1536 fp32
``Linear`` took about the same time at 8 and 64 rows and ~35% longer at 1 row.

bf16 ``Linear`` layers (oneDNN) are not row-independent there, and no setting makes them so: a row's output
has one set of bits for 1-32 rows and another above 32 (and others again for some prefill sizes), so under
``cpu_fast_path: bf16`` a request's sampled text depends on what else is batched (its logits move by ~1e-2,
enough to change samples; fp32 under strict MKL: not at all). Splitting every product into pieces of <= 32 rows
did not make whole-model logits batch-independent (measured 2026-12-01) and cost 1.2-2.5x. The engine warns at
start when its dtype's products depend on the row count; ``cpu_fast_path: fp32`` is the reproducible choice.

MKL reads ``MKL_CBWR`` once, at its first call, so ``fix_gemm_order`` runs first thing in every entry point
(``pipeline.engines.process.prepare_process``, with ``malloc.limit_arenas``) and exports the variable, so a local Ray cluster's workers start with it.
A user's own ``MKL_CBWR`` stands. ``rows_are_independent`` checks the effect in the running process; the
engine logs a warning at start when it does not hold (a process that did not start from an entry point).
"""

from __future__ import annotations

import os

MKL_CBWR = "AUTO,STRICT"


def fix_gemm_order() -> bool:
    """Export ``MKL_CBWR=AUTO,STRICT`` unless the environment already sets it. True when set here."""
    if os.environ.get("MKL_CBWR"):
        return False
    os.environ["MKL_CBWR"] = MKL_CBWR
    return True


def rows_are_independent(dtype=None) -> bool:
    """Whether the first m rows of a ``Linear`` layer's output (576 -> 1536, the embedded model's MLP shape, as
    ``torch.nn.functional.linear`` computes it) have the same bits computed alone as among 64 rows, for m = 1, 2,
    7, 16 and 33. All of each row's outputs are compared: in bf16 the rounding of the output hides most changes
    of summation order (where the kernels differ, few single outputs do)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen, dtype=torch.float32) / 24  # ~ the scale of a trained layer
    x = torch.randn(64, 576, generator=gen, dtype=torch.float32)
    if dtype is not None:
        w, x = w.to(dtype), x.to(dtype)
    full = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w), full[:m]) for m in (1, 2, 7, 16, 33))
