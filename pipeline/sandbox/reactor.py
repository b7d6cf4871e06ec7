"""The reactor: the pool's one thread, its select loop, and what sandbox processes send it.

One reactor thread owns every process and socket: callers only put work in its inbox (``SandboxPool._post``)
and wait on futures. Each turn of the loop reads what is ready (the wake-up socket, the zygote, kept states,
running steps), drains the inbox, enforces deadlines and the memory budget, and starts what may start.

Nothing a sandbox process sends is trusted and the reactor never waits on one: a fork request is sent
without waiting, its reply (tagged with a sequence number) and the child's records arrive through the
selector, and a process that sends anything out of turn (a forged result, a stray reply) is killed. A
step's pid is the one the kernel attaches to its first record (SO_PASSCRED), not one it reports. When the
loop ends, by ``close`` or by its own failure, ``_shutdown`` kills every sandbox process and fails every
step and call still waiting.

A mixin of ``SandboxPool``: its methods run on the reactor thread and reach the other parts through ``self``.
"""

from __future__ import annotations

import logging
import queue
import selectors
import shutil
import socket
import threading
import time

from pipeline.sandbox import procs, wire
from pipeline.sandbox.records import Job, State, Zygote
from pipeline.sandbox.result import INTERNAL, KILLED, TIMEOUT, describe_exit, failure

log = logging.getLogger("pipeline.sandbox.pool")  # the pool's one logger, whichever file holds the code


class Reactor:
    def _init_reactor(self) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._ready = threading.Event()
        self._closing = False
        self._fatal = ""
        self._closed = threading.Event()

    def _loop(self) -> None:
        try:
            while not self._closing:
                for key, _ in self._sel.select(self._next_wait()):
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "zygote":
                        self._on_zygote()
                    elif isinstance(key.data, State):
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
            if not job.replied and isinstance(job.forker, State) and job.forker.key in self._states:
                self._drop_state(job.forker.key)  # it never answered: stuck or hostile, not asked again
            self._finish(job, failure(TIMEOUT, f"Timeout: {budget:g}s{what}", now - job.start, job.replayed))

    # ----- records from sandbox processes -----------------------------------------------------------

    def _on_state(self, state: State) -> None:
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

    def _on_fork_reply(self, forker: State | Zygote, msg: dict) -> bool:
        """Handle a reply to one of ``forker``'s requests; False if ``msg`` is not one."""
        seq = msg.get("seq")
        if not isinstance(seq, int) or seq not in forker.asked:
            return False
        forker.asked.discard(seq)
        job = self._forks.pop(seq, None)
        cell = msg.get("cell") if isinstance(msg.get("cell"), int) else None
        if job is None:  # the step timed out before its fork was answered: its cell has no other use
            if cell is not None and isinstance(forker, Zygote):
                self._kill_cell(cell)
            return True
        if "error" in msg or not isinstance(msg.get("pid"), int):
            error = str(msg.get("error", "no pid in the reply"))[:500]
            self._abandon(job)
            if isinstance(forker, State):  # e.g. RLIMIT_NPROC reached: rebuild from the zygote instead
                self._drop_state(forker.key)
                self._pending.appendleft(job)
            else:
                self._finish(job, failure(INTERNAL, f"SandboxError: {error}", time.monotonic() - job.start))
            return True
        job.replied = True
        if isinstance(forker, Zygote):
            job.cell = cell
            self._join_cell(job)
        if job.result is not None:
            self._complete(job, job.result)
        return True

    def _on_child(self, job: Job) -> None:
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

    # ----- the end ----------------------------------------------------------------------------------

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
