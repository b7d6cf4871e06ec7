"""What every process that may run a model sets before anything else: ``prepare_process``.

Both settings take effect only if made before the libraries start: glibc applies the arena cap to arenas
created afterwards (``pipeline.engines.malloc``), and MKL reads ``MKL_CBWR`` at its first call
(``pipeline.engines.gemm``). Both are exported, so the workers of a local Ray cluster started from the process
inherit them. The entry points (round.py, pipeline.resume, python -m pipeline) call it first; the transformers
engine calls it again for a process that did not start from one of them.
"""

from __future__ import annotations


def prepare_process() -> None:
    """Cap malloc arenas and make fp32 matrix rows batch-independent (a user's own setting of either stands)."""
    from pipeline.engines.gemm import fix_gemm_order
    from pipeline.engines.malloc import limit_arenas

    limit_arenas()
    fix_gemm_order()
