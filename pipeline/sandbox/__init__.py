"""Run model-written Python isolated by the kernel, fast, and without replaying history.

``pool`` (the parent side: ``SandboxPool``, put together from ``reactor``, ``dispatch``, ``states`` and
``zygote``; see its docstring), ``worker`` (the sandbox processes), ``isolation`` (namespaces, read-only root,
seccomp, Landlock, hard rlimits: what security rests on), ``limits`` (the in-process guard: clear errors
for common mistakes, not a boundary). The README's sandbox section lists what is isolated and what is not.

from pipeline.sandbox import SandboxConfig, SandboxPool, run_code

run_code("print(2 + 3)").stdout                      # '5\\n', one-shot, fresh interpreter
with SandboxPool(SandboxConfig(workers=2)) as pool:  # an mcts.protocols.Executor
    results = pool.run(requests)                     # ExecRequest in, ExecResult out, same order
    futures = [pool.submit(r) for r in requests]     # or as they finish: as_completed(futures)
    pool.release(tree_id)                            # a finished tree's states are freed
"""

from concurrent.futures import as_completed

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.oneshot import run_code
from pipeline.sandbox.pool import SandboxPool
from pipeline.sandbox.result import ERROR_KINDS, ExecResult

__all__ = ["ERROR_KINDS", "ExecResult", "SandboxConfig", "SandboxPool", "as_completed", "run_code"]
