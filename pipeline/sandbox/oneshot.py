"""``run_code``: one execution in a fresh interpreter, on a small pool shared by the whole process.

For tools and checks that need an answer, not a search: the pool starts on first use (about a second,
to import the warm modules) and is closed at interpreter exit.
"""

from __future__ import annotations

import threading

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.pool import SandboxPool
from pipeline.sandbox.result import ExecResult

_lock = threading.Lock()
_pool: SandboxPool | None = None


def run_code(code: str, timeout: float = 5.0) -> ExecResult:
    """Run ``code`` once in a fresh sandboxed interpreter and return what happened (never raises for the code)."""
    global _pool
    with _lock:
        if _pool is None or _pool.closed:
            _pool = SandboxPool(SandboxConfig(workers=1, max_live_states=0))
        pool = _pool
    return pool.run_code(code, timeout=timeout)


def close() -> None:
    """Close the shared pool now (it is also closed at interpreter exit); the next ``run_code`` starts a new one."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()
