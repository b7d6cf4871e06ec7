"""Run model-written Python safely, fast, and without replaying history (see ``pool`` and ``worker``).

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
