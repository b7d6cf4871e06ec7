"""The parent side: ``SandboxPool`` runs steps in forked interpreter states and implements ``mcts.Executor``.

Design (see ``worker.py`` for the child side). One warm zygote per pool holds the imported modules. Every
step runs in a process forked either from the live state of its parent node (a *hit*: one fork, one step)
or, when that state is gone, from the zygote with the path's code replayed first (a *miss*; same result,
since fresh states all start from the zygote's seeded, empty interpreter). A successful step's process
stays alive as the state of its node, in a bounded LRU; a failed step's process is killed at once.

One reactor thread owns every process and socket: callers only enqueue work and wait on futures, so
``submit`` is thread-safe and cheap, and ``as_completed`` / ``asyncio.wrap_future`` work as usual.

This file is the facade: construction, the public surface, and the callers' side of the reactor's inbox.
The reactor's own work is split by concept into mixins, one a file, that share the pool's state through
``self`` and run on its thread only:

- ``reactor.Reactor``: the thread's select loop, what sandbox processes send, deadlines, shutdown;
- ``dispatch.Dispatcher``: job bookkeeping: accept, wait for a parent, start (hit or miss), finish;
- ``states.LiveStates``: the LRU of kept states, the memory budget, cells (kernel isolation), strays;
- ``zygote.ZygoteKeeper``: the warm zygote's start, messages, replacement and stop;

and ``records`` holds what they track (``Job``, ``State``, ``Zygote``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import pwd
import tempfile
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from mcts.protocols import ExecRequest
from pipeline.sandbox import procs, wire
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.dispatch import Dispatcher
from pipeline.sandbox.reactor import Reactor
from pipeline.sandbox.records import Job
from pipeline.sandbox.result import INPUT, ExecResult, failure
from pipeline.sandbox.states import LiveStates
from pipeline.sandbox.zygote import ZygoteKeeper

log = logging.getLogger(__name__)
_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()  # closed at interpreter exit, so no sandbox process outlives it

_warned_process_isolation = False  # "isolation: process" is logged once per interpreter, loudly


class SandboxPool(Reactor, Dispatcher, LiveStates, ZygoteKeeper):
    """Executes model-written steps in sandbox processes; implements ``mcts.protocols.Executor``.

    ``run(requests)`` returns results in request order; ``submit(request)`` returns a Future for the
    rollout worker's own scheduling; ``release(tree_id)`` frees a finished tree's states. Use as a
    context manager or call ``close()``: it kills every sandbox process and removes the scratch tree.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._ids = pwd.getpwnam(self.config.user) if os.geteuid() == 0 and self.config.user else None
        stale = procs.sweep_stale_scratch(tempfile.gettempdir())
        if stale:
            log.info("sandbox: removed %d scratch directories of pools that were killed: %s", len(stale),
                     ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else ""))
        self._scratch = tempfile.mkdtemp(prefix=procs.scratch_prefix())
        if self._ids is not None:
            os.chown(self._scratch, self._ids.pw_uid, self._ids.pw_gid)
        self._init_reactor()
        self._init_zygote()
        self._init_states()
        self._init_jobs()
        self.counters: Counter[str] = Counter()  # hits, misses, fresh, evictions, timeouts, killed, restarts
        self._start_zygote()
        self._thread = threading.Thread(target=self._loop, name="sandbox-pool", daemon=True)
        self._thread.start()
        _LIVE_POOLS.add(self)
        if not self._ready.wait(self.config.startup_timeout + 5) or not self._zygote_ready():
            error = self._last_start_error or "no answer"
            self.close()
            if self._missing:
                raise RuntimeError(
                    f"sandbox: kernel isolation is unavailable here: {self._missing} is missing or refused "
                    f"({error}). Steps run model-written code, so the pool does not start without it. Enable "
                    "unprivileged user namespaces / seccomp / Landlock, or set sandbox.isolation: process to run "
                    "with rlimits and the in-process guard only (not a security boundary)."
                )
            raise RuntimeError(f"sandbox: the warm worker failed to start: {error}")
        if self.config.isolation == "process":
            global _warned_process_isolation
            if not _warned_process_isolation:
                _warned_process_isolation = True
                log.warning(
                    "sandbox: isolation: process -- model-written code runs WITHOUT kernel isolation (no "
                    "namespaces, seccomp or Landlock; only rlimits and an in-process guard that the code can "
                    "switch off). Use it only where the kernel offers none and the code is not hostile."
                )

    # ----- public surface ---------------------------------------------------------------------------

    def submit(self, request: ExecRequest, timeout: float | None = None) -> Future:
        """Queue one step; the Future resolves to its ``ExecResult``. Thread-safe."""
        key = (request.tree_id, request.node_key)
        parent = (request.tree_id, request.parent_key) if request.parent_key is not None else None
        history = tuple(request.history) if parent is not None else ()
        return self._submit(Job(Future(), key, parent, request.code, history, self._timeout(timeout), keep=True))

    def submit_code(self, code: str, timeout: float | None = None) -> Future:
        """Queue a one-shot execution in a fresh interpreter whose state is not kept."""
        return self._submit(Job(Future(), None, None, code, (), self._timeout(timeout), keep=False))

    def run(self, requests: Sequence[ExecRequest]) -> list[ExecResult]:
        """Execute a batch concurrently (up to ``workers`` at once); results in request order."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    async def arun(self, requests: Sequence[ExecRequest]) -> list[ExecResult]:
        """``run`` for an asyncio caller (an async Ray actor): awaits without blocking its event loop."""
        return list(await asyncio.gather(*(asyncio.wrap_future(self.submit(r)) for r in requests)))

    def run_code(self, code: str, timeout: float | None = None) -> ExecResult:
        return self.submit_code(code, timeout).result()

    def release(self, tree_id: str) -> None:
        """Forget (kill) every live state of a finished tree; its steps still in flight are not kept."""
        self._post(("release", tree_id))

    def stats(self) -> dict[str, int]:
        """Counters plus ``live_states`` and ``running``, read consistently from the reactor thread."""
        return self._ask(
            lambda: {
                **self.counters,
                "live_states": len(self._states),
                "running": len(self._running),
                "cells": len(self._cells),
            }
        )

    def processes(self) -> dict[str, Any]:
        """Pids the pool holds: ``zygote`` and ``states`` (for monitoring, and tests that look for strays)."""

        def snapshot() -> dict[str, Any]:
            z = self._zygote.proc.pid if self._zygote is not None else None
            return {
                "zygote": z,
                "states": [s.pid for s in self._states.values()],
                "cells": list(self._cells),
                "spare": list(self._zygote.info.get("spare") or []) if self._zygote is not None else [],
                "scratch": self._scratch,
            }

        return self._ask(snapshot)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def info(self) -> dict:
        """What the warm worker reported: its pid, the user it runs as, and the modules it imported."""
        return dict(self._zygote.info) if self._zygote is not None else {}

    def close(self) -> None:
        """Kill every sandbox process, fail what is still queued, remove the scratch directory. Idempotent."""
        if self._closed.is_set():
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("sandbox: close() called from the pool's own thread (inside a Future callback)")
        if self._thread.is_alive():
            self._post(("close", None), closing=True)
            self._thread.join()
        else:
            self._shutdown()
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- callers' side of the inbox ---------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        t = self.config.timeout if timeout is None else float(timeout)
        if not (t > 0) or math.isinf(t):
            raise ValueError(f"timeout={timeout}: must be a positive finite number of seconds")
        return t

    def _submit(self, job: Job) -> Future:
        size = len(wire.encode({"codes": [*job.history, job.code]}))
        if size > self.config.max_code_bytes:
            job.future.set_result(
                failure(
                    INPUT,
                    f"InputTooLarge: {size} bytes of code and history; max_code_bytes is {self.config.max_code_bytes}",
                )
            )
            return job.future
        self._post(("submit", job))
        return job.future

    def _post(self, item: tuple, closing: bool = False) -> None:
        if not closing and (self._closing or self._closed.is_set()):
            raise RuntimeError("sandbox: this SandboxPool is closed; create a new one")
        self._inbox.put(item)
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # the wake-up pipe is full, so the reactor is already due to wake

    def _ask(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._post(("call", (fn, fut)))
        return fut.result()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()
