"""The warm zygote's life: start it, read what it says, replace it when it dies, stop it.

One zygote per pool holds the imported warm modules (a fresh interpreter, seeded and empty, ready to fork).
A step whose parent has no live state is forked from it with the path's code replayed first (a *miss*);
fresh states all start from it, so a replay gives the same result. It also keeps spare cells ready while
idle and answers fork requests through the selector like a kept state does. A zygote lost after it was
ready is replaced at once, and the forks it never answered go back to the queue. One that fails to start
``_MAX_START_FAILURES`` times in a row fails the pending steps; a missing kernel feature fails at once
(retrying cannot help) and ``SandboxPool`` refuses to start with its name.

A mixin of ``SandboxPool``: its methods run on the reactor thread and reach the other parts through ``self``.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import time

from pipeline.sandbox import procs, wire
from pipeline.sandbox.records import Zygote
from pipeline.sandbox.result import INTERNAL, failure

log = logging.getLogger("pipeline.sandbox.pool")  # the pool's one logger, whichever file holds the code

_MAX_START_FAILURES = 3  # zygote starts that fail in a row before pending steps are failed


class ZygoteKeeper:
    def _init_zygote(self) -> None:
        self._zygote: Zygote | None = None
        self._start_failures = 0
        self._last_start_error = ""
        self._missing = ""  # a kernel feature the warm worker reported missing (fatal at start)

    def _zygote_ready(self) -> bool:
        return self._zygote is not None and self._zygote.ready

    def _start_zygote(self) -> None:
        proc, sock = procs.spawn_zygote(self.config, self._scratch)
        sock.setblocking(False)
        self._zygote = Zygote(proc, sock, time.monotonic())
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

    def _fail_forks_of(self, z: Zygote) -> None:
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
