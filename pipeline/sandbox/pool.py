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

Nothing a sandbox process sends is trusted and the reactor never waits on one: a fork request is sent
without waiting, its reply (tagged with a sequence number) and the child's records arrive through the
selector, and a process that sends anything out of turn (a forged result, a stray reply) is killed. A
step's pid is the one the kernel attaches to its first record (SO_PASSCRED), not one it reports. After a
step the pool looks at it from outside (/proc): a step that left threads or processes behind is refused
and, under kernel isolation, its whole cell is killed (see ``isolation``).
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
import signal
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
    FORBIDDEN,
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
_MEMORY_CHECK_EVERY = 1.0  # seconds between PSS readings of the kept states (memory_budget_mb)
_warned_process_isolation = False  # "isolation: process" is logged once per interpreter, loudly


@dataclass(eq=False)  # identity: jobs live in a set and key the selector
class _Job:
    future: Future
    key: tuple[str, str] | None  # (tree_id, node_key); None for a one-shot execution
    parent: tuple[str, str] | None
    code: str
    history: tuple[str, ...]
    timeout: float
    keep: bool
    pid: int = 0  # host pid, from the kernel's credentials on the child's first record; 0 until then
    sock: socket.socket | None = None
    codes: int = 1  # steps this execution runs (1 + replayed)
    replayed: int = 0
    start: float = 0.0
    deadline: float = math.inf
    marked_running: bool = False  # Future.set_running_or_notify_cancel() may be called once only
    seq: int = 0  # of the fork request that started it
    forker: Any = None  # the _State or _Zygote asked to fork it
    replied: bool = False  # the forker answered the request
    cell: int | None = None  # host pid of the cell's init (kernel isolation)
    result: ExecResult | None = None  # arrived before the forker's reply: held until it comes
    violation: str = ""  # why its process may not be kept


@dataclass(eq=False)
class _State:
    pid: int
    sock: socket.socket
    tree_id: str
    key: tuple[str, str]
    cell: int | None
    asked: set[int] = field(default_factory=set)  # sequence numbers sent and not yet answered


@dataclass(eq=False)
class _Zygote:
    proc: subprocess.Popen
    sock: socket.socket
    started: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)


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
        self._seq = itertools.count(1)
        self._forks: dict[int, _Job] = {}  # sequence number -> job whose fork reply is awaited
        self._cells: dict[int, set] = {}  # cell init pid -> its members (kept state keys and jobs)
        self._next_memory_check = 0.0
        self._missing = ""  # a kernel feature the warm worker reported missing (fatal at start)
        self._unsettled: dict[int, float] = {}  # cell -> until when an abandoned fork may still be running in it
        self._killed: dict[int, float] = {}  # pid -> when the pool sent it SIGKILL
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
                    elif isinstance(key.data, _State):
                        self._on_state(key.data)
                    elif key.data in self._running:  # not finished by an earlier event of this round
                        self._on_child(key.data)
                self._drain_inbox()
                self._check_deadlines()
                self._check_memory()
                self._dispatch()
        except BaseException as exc:
            log.exception("sandbox: the pool's reactor failed; failing every queued step")
            self._fatal = f"sandbox: the pool failed ({type(exc).__name__}: {exc}); create a new SandboxPool"
            raise
        finally:
            self._shutdown()

    def _next_wait(self) -> float | None:
        deadlines = [j.deadline for j in self._running]
        if self._states and self.config.memory_budget_mb:
            deadlines.append(self._next_memory_check)
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
        state = self._states.get(job.parent) if job.parent is not None else None
        if state is not None:
            self._states.move_to_end(job.parent)
            if self._ask_fork(job, state, [job.code], cpu):
                self.counters["hits"] += 1
                job.cell = state.cell
                self._join_cell(job)
            else:
                state = None
        if state is None:
            assert self._zygote is not None
            if not self._ask_fork(job, self._zygote, [*job.history, job.code], cpu):
                self._pending.appendleft(job)  # not the step's fault: run it on the replacement
                self._zygote_lost("it stopped reading its requests")
                return
            self.counters["misses" if job.parent is not None else "fresh"] += 1
            job.replayed = len(job.history)
        job.codes = 1 + job.replayed
        job.deadline = job.start + job.timeout * job.codes + _FORK_ALLOWANCE
        self._running.add(job)

    def _ask_fork(self, job: _Job, forker: _State | _Zygote, codes: list[str], cpu: int) -> bool:
        """Send the fork request; False when ``forker`` cannot take it now (a state is then dropped)."""
        job.seq = next(self._seq)
        try:
            job.sock = procs.request_fork(forker.sock, job.seq, codes, cpu)
        except OSError as exc:  # BlockingIOError: it does not read its socket; else it is gone
            if isinstance(forker, _State):
                log.warning(
                    "sandbox: state %s of tree %r cannot fork (%s); rebuilding", forker.key[1], forker.tree_id, exc
                )
                self._drop_state(forker.key)
            return False
        job.forker = forker
        forker.asked.add(job.seq)
        self._forks[job.seq] = job
        self._sel.register(job.sock, selectors.EVENT_READ, job)
        return True

    # ----- records from sandbox processes -----------------------------------------------------------

    def _on_state(self, state: _State) -> None:
        """A kept state wrote: the reply to a fork request, or anything else, which costs it its life."""
        try:
            msg = wire.recv(state.sock)
        except BlockingIOError:
            return  # woken for a record another event already consumed
        except (OSError, wire.ProtocolError) as exc:
            msg = {"unreadable": str(exc)}
        if msg is not None and self._on_fork_reply(state, msg):
            return
        if state.key in self._states and self._states[state.key] is state:
            if msg is not None:
                self.counters["violations"] += 1
                log.warning(
                    "sandbox: state %s of tree %r sent %.200s out of turn; killed", state.key[1], state.tree_id, msg
                )
            self._drop_state(state.key)

    def _on_fork_reply(self, forker: _State | _Zygote, msg: dict) -> bool:
        """Handle a reply to one of ``forker``'s requests; False if ``msg`` is not one."""
        seq = msg.get("seq")
        if not isinstance(seq, int) or seq not in forker.asked:
            return False
        forker.asked.discard(seq)
        job = self._forks.pop(seq, None)
        cell = msg.get("cell") if isinstance(msg.get("cell"), int) else None
        if job is None:  # the step timed out before its fork was answered: its cell has no other use
            if cell is not None and isinstance(forker, _Zygote):
                self._kill_cell(cell)
            return True
        if "error" in msg or not isinstance(msg.get("pid"), int):
            error = str(msg.get("error", "no pid in the reply"))[:500]
            self._abandon(job)
            if isinstance(forker, _State):  # e.g. RLIMIT_NPROC reached: rebuild from the zygote instead
                self._drop_state(forker.key)
                self._pending.appendleft(job)
            else:
                self._finish(job, failure(INTERNAL, f"SandboxError: {error}", time.monotonic() - job.start))
            return True
        job.replied = True
        if isinstance(forker, _Zygote):
            job.cell = cell
            self._join_cell(job)
        if job.result is not None:
            self._complete(job, job.result)
        return True

    def _abandon(self, job: _Job) -> None:
        """Stop tracking a started job's process (its fork failed or its forker died): it is not running any more.

        A process forked just before may live on for a moment (until its next write to the closed socket
        fails); it must not be taken for another step's stray meanwhile.
        """
        if job.cell is not None:
            self._unsettled[job.cell] = time.monotonic() + 2.0
        self._forks.pop(job.seq, None)
        self._running.discard(job)
        if job.sock is not None:
            self._sel.unregister(job.sock)
            job.sock.close()
            job.sock = None
        self._leave_cell(job)

    def _on_child(self, job: _Job) -> None:
        """The step's own process wrote: first a hello (its pid), then its result; nothing after."""
        assert job.sock is not None
        elapsed = time.monotonic() - job.start
        try:
            msg, pid = procs.recv_with_pid(job.sock)
        except BlockingIOError:
            return  # woken for a record another event already consumed
        except (OSError, wire.ProtocolError) as exc:
            self._finish(job, failure(KILLED, f"Killed: unreadable result ({exc})", elapsed, job.replayed))
            return
        if msg is None:
            kind, error = describe_exit(procs.exit_status(job.pid) if job.pid else None)
            self.counters["killed"] += 1
            job.result = job.result or failure(kind, error, elapsed, job.replayed)
            if job.replied:
                self._complete(job, job.result)
            return
        if not job.pid:
            if msg.get("hello") is not True or not pid:
                self._finish(job, failure(KILLED, f"Killed: no hello from the new process ({msg!r:.100})", elapsed))
                return
            job.pid = pid
            return
        if job.result is not None:  # a second result: the step wrote on the channel itself
            job.violation = "it wrote to the sandbox's result channel"
            return
        try:
            result = procs.result_from(msg, elapsed, job.replayed)
        except (KeyError, TypeError, ValueError) as exc:
            result = failure(KILLED, f"Killed: malformed result ({exc})", elapsed, job.replayed)
        job.result = result
        if job.replied:
            self._complete(job, result)

    def _complete(self, job: _Job, result: ExecResult) -> None:
        """The step reported and its fork was answered: look at its process from outside, then finish."""
        if result.ok and not job.violation:
            threads, kids = procs.tasks_and_children(job.pid)
            strays = [p for p in kids + self._strays_in_cell(job) if p not in self._killed]
            if threads > 1 or strays:
                job.violation = f"it left {threads - 1} extra thread(s) and {len(strays)} process(es) running"
                log.warning(
                    "sandbox: step %s of tree %r (pid %d, cell %s) %s: %s",
                    job.key[1] if job.key else "?",
                    job.key[0] if job.key else "?",
                    job.pid,
                    job.cell,
                    job.violation,
                    [procs.describe(p) for p in strays],
                )
                self._kill_strays(job, strays)
        elif job.cell is not None and (
            [p for p in procs.tasks_and_children(job.pid)[1] if p not in self._killed] or self._strays_in_cell(job)
        ):
            self._kill_strays(job, [])  # a failed step that forked: its processes die with the cell now
        if job.violation and result.ok:
            result = failure(FORBIDDEN, f"PermissionError: {job.violation}", result.duration, result.replayed)
            self.counters["violations"] += 1
        self._finish(job, result)

    def _strays_in_cell(self, job: _Job) -> list[int]:
        """Children of the cell's init that are neither states nor running steps (a setsid'd grandchild)."""
        if job.cell is None or any(isinstance(m, _Job) and not m.pid for m in self._cells.get(job.cell, ())):
            return []  # a fork in flight: its process is not known yet, so nothing can be called a stray
        if self._unsettled.get(job.cell, 0.0) > time.monotonic():
            return []
        known = {m.pid for m in self._cells.get(job.cell, ()) if isinstance(m, _Job)}
        known |= {s.pid for s in self._states.values() if s.cell == job.cell}
        return [k for k in procs.tasks_and_children(job.cell)[1] if k not in known and k not in self._killed]

    def _kill_strays(self, job: _Job, strays: list[int]) -> None:
        if job.cell is not None:  # the cell's processes all die with its init; its states go with them
            cell = job.cell
            self._leave_cell(job)
            for key in [k for k, st in self._states.items() if st.cell == cell]:
                self._drop_state(key)
            self._kill_cell(cell)
            return
        for pid in strays:  # process isolation: kill what can be found; a setsid'd process can hide
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass  # gone already

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        z = self._zygote
        if z is not None and not z.ready and now > z.started + self.config.startup_timeout:
            self._zygote_lost(f"it did not report ready within startup_timeout={self.config.startup_timeout}s")
        for job in [j for j in self._running if j.deadline <= now]:
            self.counters["timeouts"] += 1
            budget = job.timeout * job.codes
            what = f" (rebuild: {job.replayed} replayed steps and the step)" if job.replayed else ""
            self._forks.pop(job.seq, None)  # finished here, not requeued by the state's drop below
            if job.cell is not None and job.pid and procs.tasks_and_children(job.pid)[1]:
                self._kill_strays(job, [])  # what the step forked would outlive it in the cell
            if not job.replied and isinstance(job.forker, _State) and job.forker.key in self._states:
                self._drop_state(job.forker.key)  # it never answered: stuck or hostile, not asked again
            self._finish(job, failure(TIMEOUT, f"Timeout: {budget:g}s{what}", now - job.start, job.replayed))

    def _check_memory(self) -> None:
        budget = self.config.memory_budget_mb
        now = time.monotonic()
        if not budget or not self._states or now < self._next_memory_check:
            return
        pss = {key: procs.pss_kb(s.pid) for key, s in self._states.items()}
        total = sum(pss.values()) + sum(procs.pss_kb(j.pid) for j in self._running if j.pid)
        # Reading PSS walks each process's page tables (ms for a sympy-sized state): keep it under ~5%.
        self._next_memory_check = time.monotonic() + max(_MEMORY_CHECK_EVERY, 20 * (time.monotonic() - now))
        while total > budget * 1024 and self._states:
            key = next(iter(self._states))  # least recently used
            total -= pss.get(key, 0)
            self.counters["memory_evictions"] += 1
            self._drop_state(key)

    def _finish(self, job: _Job, result: ExecResult) -> None:
        self._forks.pop(job.seq, None)
        if job in self._running:
            self._running.discard(job)
            if job.sock is not None:
                self._sel.unregister(job.sock)
                keep = result.ok and job.keep and self.config.max_live_states > 0 and not job.violation
                if keep and job.pid and (job.cell is not None or self.config.isolation == "process"):
                    self._keep_state(job)
                else:
                    self._kill_proc(job.pid, job.sock)
            self._leave_cell(job)
        self._forget(job)
        job.future.set_result(result)

    def _forget(self, job: _Job) -> None:
        assert job.key is not None
        self._outstanding.discard(job)
        self._inflight[job.key] -= 1
        if self._inflight[job.key] <= 0:
            del self._inflight[job.key]
            self._pending.extendleft(reversed(self._blocked.pop(job.key, [])))

    # ----- cells (kernel isolation) -----------------------------------------------------------------

    def _join_cell(self, job: _Job) -> None:
        if job.cell is not None:
            self._cells.setdefault(job.cell, set()).add(job)

    def _leave_cell(self, member: Any) -> None:
        cell = member.cell
        if cell is None or cell not in self._cells:
            return
        self._cells[cell].discard(member.key if isinstance(member, _State) else member)
        if not self._cells[cell]:
            del self._cells[cell]
            self._kill_cell(cell)

    def _kill_cell(self, cell: int) -> None:
        """SIGKILL a cell's init: the kernel then kills every process of its PID namespace."""
        self._cells.pop(cell, None)
        self._unsettled.pop(cell, None)
        try:
            os.kill(cell, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone with the warm worker

    # ----- states -----------------------------------------------------------------------------------

    def _keep_state(self, job: _Job) -> None:
        assert job.key is not None and job.sock is not None
        if job.key in self._states:  # the same node executed twice: the newer state wins
            self._drop_state(job.key)
        state = _State(job.pid, job.sock, job.key[0], job.key, job.cell)
        self._states[job.key] = state
        if job.cell is not None:
            self._cells.setdefault(job.cell, set()).add(job.key)
        self._sel.register(job.sock, selectors.EVENT_READ, state)  # anything it writes unasked kills it
        while len(self._states) > self.config.max_live_states:
            self.counters["evictions"] += 1
            self._drop_state(next(iter(self._states)))

    def _drop_state(self, key: tuple[str, str]) -> None:
        state = self._states.pop(key)
        self._sel.unregister(state.sock)
        for seq in state.asked:  # forks it was asked for and never answered
            job = self._forks.get(seq)
            if job is not None and not job.pid and job in self._running:
                self._abandon(job)
                job.forker, job.replied = None, False
                self._pending.appendleft(job)  # rebuilt from the zygote instead
        self._kill_proc(state.pid, state.sock)
        self._leave_cell(state)

    # ----- the zygote -------------------------------------------------------------------------------

    def _zygote_ready(self) -> bool:
        return self._zygote is not None and self._zygote.ready

    def _kill_proc(self, pid: int, sock: socket.socket) -> None:
        if pid:
            # Kernel isolation: the pid alone. A child it forked a moment ago may not have left its process
            # group yet, and strays are the cell's business. Process isolation: the group too.
            procs.kill(pid, sock, self._scratch, group=self.config.isolation == "process")
            # SIGKILL takes a moment: until then the process still looks alive in /proc, and must not look
            # like a stray of the next step of its cell.
            now = time.monotonic()
            self._killed[pid] = now
            if len(self._killed) > 4096:
                self._killed = {p: t for p, t in self._killed.items() if now - t < 10.0}
        else:
            sock.close()  # never said hello: closing its socket ends it (its first send fails)

    def _start_zygote(self) -> None:
        proc, sock = procs.spawn_zygote(self.config, self._scratch)
        sock.setblocking(False)
        self._zygote = _Zygote(proc, sock, time.monotonic())
        self._sel.register(sock, selectors.EVENT_READ, "zygote")

    def _on_zygote(self) -> None:
        z = self._zygote
        assert z is not None
        try:
            msg = wire.recv(z.sock)
        except BlockingIOError:
            return
        except (OSError, wire.ProtocolError) as exc:
            msg = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
        if msg is not None and z.ready and set(msg) == {"spare"}:
            z.info["spare"] = msg["spare"]  # the cells the warm worker holds ready for fresh steps
            return
        if msg is not None and z.ready and self._on_fork_reply(z, msg):
            return
        if msg is not None and msg.get("missing") and not z.ready:
            self._missing = str(msg["missing"])  # the kernel lacks it: retrying cannot help
            self._start_failures = _MAX_START_FAILURES
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
            self._fail_forks_of(z)
            log.warning("sandbox: warm worker %d lost (%s); starting a new one", z.proc.pid, reason)
            self.counters["restarts"] += 1
            self._start_zygote()
            return
        self._start_failures += 1
        self._fail_forks_of(z)
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

    def _fail_forks_of(self, z: _Zygote) -> None:
        """Requests the lost zygote never answered go back to the queue (its cells died with it)."""
        for seq in z.asked:
            job = self._forks.get(seq)
            if job is not None and job in self._running:
                self._abandon(job)
                job.forker, job.replied, job.replayed = None, False, 0
                self._pending.appendleft(job)
        z.asked.clear()
        self._cells.clear()  # every cell's init died with the warm worker

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
        self._forks.clear()  # nothing is requeued from here on
        for job in list(self._outstanding):
            if job.sock is not None and job in self._running:
                self._sel.unregister(job.sock)
                self._kill_proc(job.pid, job.sock)
            if not job.future.done():
                job.future.set_exception(err)
        for cell in list(self._cells):
            self._kill_cell(cell)
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
