"""The parent side: ``SandboxPool`` runs steps in forked interpreter states and implements ``mcts.Executor``.

Design (see ``worker.py`` for the child side). One warm zygote per pool holds the imported modules. Every
step runs in a process forked either from the live state of its parent node (a *hit*: one fork, one step)
or, when that state is gone, from the zygote with the path's code replayed first (a *miss*; same result,
since fresh states all start from the zygote's seeded, empty interpreter). A successful step's process
stays alive as the state of its node, in a bounded LRU keyed by (tree_id, node_key); a failed step's
process is killed at once. Siblings are separate processes, so a step sees its ancestors' names and
nobody else's.

One reactor thread owns every process and socket: callers only enqueue work and wait on futures, so
``submit`` is thread-safe and cheap, and ``as_completed`` / ``asyncio.wrap_future`` work as usual. At most
``workers`` steps execute at once; each gets a wall-clock deadline (``timeout`` per executed step), after
which its whole process group is SIGKILLed. A worker that dies is reported as a ``killed`` error for the
step it was running, never retried; a dead zygote is replaced.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import os
import pwd
import queue
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mcts.protocols import ExecRequest
from pipeline.sandbox import procs, wire
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.result import (
    INPUT,
    INTERNAL,
    KILLED,
    TIMEOUT,
    ExecResult,
    describe_exit,
    failure,
)

log = logging.getLogger(__name__)
_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()  # closed at interpreter exit, so no sandbox process outlives it

_FORK_ALLOWANCE = 0.5  # seconds added to a step's deadline for the fork and the result's trip back
_MAX_START_FAILURES = 3  # zygote starts that fail in a row before pending steps are failed


@dataclass(eq=False)  # identity: jobs live in a set and key the selector
class _Job:
    future: Future
    key: tuple[str, str] | None  # (tree_id, node_key); None for a one-shot execution
    parent: tuple[str, str] | None
    code: str
    history: tuple[str, ...]
    timeout: float
    keep: bool
    pid: int = 0
    sock: socket.socket | None = None
    codes: int = 1  # steps this execution runs (1 + replayed)
    replayed: int = 0
    start: float = 0.0
    deadline: float = math.inf
    marked_running: bool = False  # Future.set_running_or_notify_cancel() may be called once only


@dataclass
class _State:
    pid: int
    sock: socket.socket
    tree_id: str


@dataclass
class _Zygote:
    proc: subprocess.Popen
    sock: socket.socket
    started: float
    ready: bool = False
    info: dict = field(default_factory=dict)


class SandboxPool:
    """Executes model-written steps in sandbox processes; implements ``mcts.protocols.Executor``.

    ``run(requests)`` returns results in request order; ``submit(request)`` returns a Future for the
    rollout worker's own scheduling; ``release(tree_id)`` frees a finished tree's states. Use as a
    context manager or call ``close()``: it kills every sandbox process and removes the scratch tree.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._ids = pwd.getpwnam(self.config.user) if os.geteuid() == 0 and self.config.user else None
        self._scratch = tempfile.mkdtemp(prefix="open-rstar-sandbox-")
        if self._ids is not None:
            os.chown(self._scratch, self._ids.pw_uid, self._ids.pw_gid)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._zygote: _Zygote | None = None
        self._start_failures = 0
        self._last_start_error = ""
        self._states: OrderedDict[tuple[str, str], _State] = OrderedDict()
        self._pending: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._blocked: dict[tuple[str, str], list[_Job]] = {}
        self._inflight: Counter[tuple[str, str]] = Counter()
        self._outstanding: set[_Job] = set()  # accepted and not finished, wherever it waits
        self._oneshot = itertools.count()
        self.counters: Counter[str] = Counter()  # hits, misses, fresh, evictions, timeouts, killed, restarts
        self._ready = threading.Event()
        self._closing = False
        self._fatal = ""
        self._closed = threading.Event()
        self._start_zygote()
        self._thread = threading.Thread(target=self._loop, name="sandbox-pool", daemon=True)
        self._thread.start()
        _LIVE_POOLS.add(self)
        if not self._ready.wait(self.config.startup_timeout + 5) or not self._zygote_ready():
            error = self._last_start_error or "no answer"
            self.close()
            raise RuntimeError(f"sandbox: the warm worker failed to start: {error}")

    # ----- public surface ---------------------------------------------------------------------------

    def submit(self, request: ExecRequest, timeout: float | None = None) -> Future:
        """Queue one step; the Future resolves to its ``ExecResult``. Thread-safe."""
        key = (request.tree_id, request.node_key)
        parent = (request.tree_id, request.parent_key) if request.parent_key is not None else None
        history = tuple(request.history) if parent is not None else ()
        return self._submit(_Job(Future(), key, parent, request.code, history, self._timeout(timeout), keep=True))

    def submit_code(self, code: str, timeout: float | None = None) -> Future:
        """Queue a one-shot execution in a fresh interpreter whose state is not kept."""
        return self._submit(_Job(Future(), None, None, code, (), self._timeout(timeout), keep=False))

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
        return self._ask(lambda: {**self.counters, "live_states": len(self._states), "running": len(self._running)})

    def processes(self) -> dict[str, Any]:
        """Pids the pool holds: ``zygote`` and ``states`` (for monitoring, and tests that look for strays)."""

        def snapshot() -> dict[str, Any]:
            z = self._zygote.proc.pid if self._zygote is not None else None
            return {"zygote": z, "states": [s.pid for s in self._states.values()], "scratch": self._scratch}

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

    def _submit(self, job: _Job) -> Future:
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

    # ----- the reactor ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._closing:
                for key, _ in self._sel.select(self._next_wait()):
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "zygote":
                        self._on_zygote()
                    else:
                        self._on_result(key.data)
                self._drain_inbox()
                self._check_deadlines()
                self._dispatch()
        except BaseException as exc:
            log.exception("sandbox: the pool's reactor failed; failing every queued step")
            self._fatal = f"sandbox: the pool failed ({type(exc).__name__}: {exc}); create a new SandboxPool"
            raise
        finally:
            self._shutdown()

    def _next_wait(self) -> float | None:
        deadlines = [j.deadline for j in self._running]
        if self._zygote is not None and not self._zygote.ready:
            deadlines.append(self._zygote.started + self.config.startup_timeout)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass  # drained

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "submit":
                self._accept(arg)
            elif op == "release":
                self._release(arg)
            elif op == "call":
                fn, fut = arg
                fut.set_result(fn())
            elif op == "close":
                self._closing = True

    def _accept(self, job: _Job) -> None:
        if job.key is None:
            job.key = ("", f"oneshot-{next(self._oneshot)}")
        self._inflight[job.key] += 1
        self._outstanding.add(job)
        self._pending.append(job)
        if self._zygote is None:  # it failed to start before; a new request is the cue to try again
            self._start_failures = 0
            self._start_zygote()

    def _release(self, tree_id: str) -> None:
        for key in [k for k, s in self._states.items() if s.tree_id == tree_id]:
            self._drop_state(key)
        for job in itertools.chain(self._running, self._pending, *self._blocked.values()):
            if job.key is not None and job.key[0] == tree_id:
                job.keep = False

    def _dispatch(self) -> None:
        while self._pending and len(self._running) < self.config.workers and self._zygote_ready():
            job = self._pending.popleft()
            if job.parent is not None and self._inflight[job.parent] > 0:
                # Its parent is queued or running: wait for it and fork from its state instead of replaying.
                self._blocked.setdefault(job.parent, []).append(job)
                continue
            if not job.marked_running:
                job.marked_running = True
                if not job.future.set_running_or_notify_cancel():  # cancelled while it waited
                    self._forget(job)
                    continue
            self._start(job)

    def _start(self, job: _Job) -> None:
        job.start = time.monotonic()
        cpu = math.ceil(job.timeout) + 1
        child = None
        state = self._states.get(job.parent) if job.parent is not None else None
        if state is not None:
            self._states.move_to_end(job.parent)
            try:
                child = procs.fork(state.sock, [job.code], cpu)
                self.counters["hits"] += 1
            except procs.ForkFailed as exc:
                log.warning(
                    "sandbox: state %s of tree %r could not fork (%s); rebuilding", job.parent[1], job.parent[0], exc
                )
                self._drop_state(job.parent)
        if child is None:
            assert self._zygote is not None
            try:
                child = procs.fork(self._zygote.sock, [*job.history, job.code], cpu)
                self.counters["misses" if job.parent is not None else "fresh"] += 1
            except procs.ForkFailed as exc:
                if exc.dead:
                    self._pending.appendleft(job)  # not the step's fault: run it on the replacement
                    self._zygote_lost(f"it stopped answering ({exc})")
                else:
                    self._finish(job, failure(INTERNAL, f"SandboxError: {exc}"))
                return
            job.replayed = len(job.history)
        job.pid, job.sock = child
        job.codes = 1 + job.replayed
        job.deadline = job.start + job.timeout * job.codes + _FORK_ALLOWANCE
        self._running.add(job)
        self._sel.register(job.sock, selectors.EVENT_READ, job)

    def _on_result(self, job: _Job) -> None:
        assert job.sock is not None
        elapsed = time.monotonic() - job.start
        try:
            msg = wire.recv(job.sock)
        except (OSError, wire.ProtocolError) as exc:
            self._finish(job, failure(KILLED, f"Killed: unreadable result ({exc})", elapsed, job.replayed))
            return
        if msg is None:
            kind, error = describe_exit(procs.exit_status(job.pid))
            self.counters["killed"] += 1
            self._finish(job, failure(kind, error, elapsed, job.replayed))
            return
        try:
            result = procs.result_from(msg, elapsed, job.replayed)
        except (KeyError, TypeError, ValueError) as exc:
            result = failure(KILLED, f"Killed: malformed result ({exc})", elapsed, job.replayed)
        self._finish(job, result)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        z = self._zygote
        if z is not None and not z.ready and now > z.started + self.config.startup_timeout:
            self._zygote_lost(f"it did not report ready within startup_timeout={self.config.startup_timeout}s")
        for job in [j for j in self._running if j.deadline <= now]:
            self.counters["timeouts"] += 1
            budget = job.timeout * job.codes
            what = f" (rebuild: {job.replayed} replayed steps and the step)" if job.replayed else ""
            self._finish(job, failure(TIMEOUT, f"Timeout: {budget:g}s{what}", now - job.start, job.replayed))

    def _finish(self, job: _Job, result: ExecResult) -> None:
        if job in self._running:
            self._running.discard(job)
            assert job.sock is not None
            self._sel.unregister(job.sock)
            if result.ok and job.keep and self.config.max_live_states > 0:
                self._keep_state(job)
            else:
                self._kill_proc(job.pid, job.sock)
        self._forget(job)
        job.future.set_result(result)

    def _forget(self, job: _Job) -> None:
        assert job.key is not None
        self._outstanding.discard(job)
        self._inflight[job.key] -= 1
        if self._inflight[job.key] <= 0:
            del self._inflight[job.key]
            self._pending.extendleft(reversed(self._blocked.pop(job.key, [])))

    # ----- states -----------------------------------------------------------------------------------

    def _keep_state(self, job: _Job) -> None:
        assert job.key is not None and job.sock is not None
        if job.key in self._states:  # the same node executed twice: the newer state wins
            self._drop_state(job.key)
        job.sock.settimeout(procs.FORK_REPLY_TIMEOUT)
        self._states[job.key] = _State(job.pid, job.sock, job.key[0])
        while len(self._states) > self.config.max_live_states:
            self.counters["evictions"] += 1
            self._drop_state(next(iter(self._states)))

    def _drop_state(self, key: tuple[str, str]) -> None:
        state = self._states.pop(key)
        self._kill_proc(state.pid, state.sock)

    # ----- the zygote -------------------------------------------------------------------------------

    def _zygote_ready(self) -> bool:
        return self._zygote is not None and self._zygote.ready

    def _kill_proc(self, pid: int, sock: socket.socket) -> None:
        procs.kill(pid, sock, self._scratch)

    def _start_zygote(self) -> None:
        proc, sock = procs.spawn_zygote(self.config, self._scratch)
        self._zygote = _Zygote(proc, sock, time.monotonic())
        self._sel.register(sock, selectors.EVENT_READ, "zygote")

    def _on_zygote(self) -> None:
        z = self._zygote
        assert z is not None
        try:
            msg = wire.recv(z.sock)
        except (OSError, wire.ProtocolError) as exc:
            msg = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
        if msg is not None and msg.get("ready") is True and not z.ready:
            z.ready, z.info = True, msg
            if msg.get("warning"):
                log.warning("sandbox: %s", msg["warning"])
            self._start_failures = 0
            self._ready.set()
            return
        reason = "it exited" if msg is None else str(msg.get("error", f"unexpected message {msg}"))
        self._zygote_lost(reason)

    def _zygote_lost(self, reason: str) -> None:
        z = self._zygote
        assert z is not None
        was_ready = z.ready
        self._stop_zygote()
        if was_ready:
            log.warning("sandbox: warm worker %d lost (%s); starting a new one", z.proc.pid, reason)
            self.counters["restarts"] += 1
            self._start_zygote()
            return
        self._start_failures += 1
        self._last_start_error = f"{reason}; log: {procs.tail(os.path.join(self._scratch, 'zygote.log'))}"
        if self._start_failures < _MAX_START_FAILURES and not self._closing:
            self._start_zygote()
            return
        self._ready.set()  # wake __init__, which reports the error
        while self._pending:
            job = self._pending.popleft()
            self._forget(job)
            if job.marked_running or job.future.set_running_or_notify_cancel():
                job.future.set_result(failure(INTERNAL, f"SandboxError: no warm worker: {self._last_start_error}"))

    def _stop_zygote(self) -> None:
        z = self._zygote
        if z is None:
            return
        self._zygote = None
        self._sel.unregister(z.sock)
        z.sock.close()  # end of stream: a live zygote kills everything below it and exits
        try:
            z.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            z.proc.kill()
            z.proc.wait()

    def _shutdown(self) -> None:
        if self._closed.is_set():
            return
        self._closing = True
        err = RuntimeError(self._fatal or "sandbox: the SandboxPool was closed before this step ran")
        for job in list(self._outstanding):
            if job.sock is not None and job in self._running:
                self._kill_proc(job.pid, job.sock)
            if not job.future.done():
                job.future.set_exception(err)
        self._outstanding.clear()
        self._running.clear()
        self._pending.clear()
        self._blocked.clear()
        for key in list(self._states):
            self._drop_state(key)
        self._stop_zygote()
        while True:  # answer callers still waiting in _ask
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if op == "call":
                arg[1].set_exception(err)
            elif op == "submit" and not arg.future.done():
                arg.future.set_exception(err)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        shutil.rmtree(self._scratch, onerror=procs.rmtree_error)
        self._closed.set()
        self._ready.set()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()
