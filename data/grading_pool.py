"""Warm worker processes for the slow tier of answer comparison, with a wall-clock bound per answer.

Why processes, and why not signals: math-verify/sympy can hang or eat memory on model output
(``10^{10^{10}}``), ``signal.alarm`` only works on the main thread of the main interpreter (not in
a thread pool, not in a Ray actor), and a thread cannot be stopped. So each comparison runs in a
small persistent worker process (``python -m data.grading_worker``, talking JSON lines over
its stdin/stdout); the parent waits on the pipes with a deadline and kills a worker that passes it,
then starts a replacement. A timeout or a crash is an answer of "not equal" with the reason.

Workers are plain subprocesses rather than ``multiprocessing`` children: nothing is pickled, the
caller's ``__main__`` is never re-imported, and it works the same from any thread, under pytest and
inside a Ray actor. Each batch checks workers out of the pool, so several threads can grade at once.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from data.equivalence import Verdict

# Verdict reasons that depend on timing or luck, not on the answers (callers must not cache them).
TIMED_OUT = "timed out after"
WORKER_DIED = "grading worker died"
UNCACHEABLE = (TIMED_OUT, WORKER_DIED, "not graded")
_READY = "ready"  # the first message of a worker that has imported everything (data.grading_worker)
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)  # so `-m data.grading_worker` resolves anywhere


class GradingWorkerError(RuntimeError):
    """The pool cannot work at all (a worker would not start); a single bad answer never raises this."""


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, memory_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "data.grading_worker", "--memory-mb", str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=_PROJECT_ROOT,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None  # index into the current batch
        self.deadline = 0.0
        self.broken = False  # a write failed: the process is gone; its end of file triggers the replacement

    def send(self, index: int, prediction: str, reference: str, timeout_s: float) -> bool:
        """Hand one comparison over; False if the worker is gone (a broken pipe)."""
        line = json.dumps({"i": index, "p": prediction, "r": reference}) + "\n"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):  # a broken pipe (or a closed one): the worker died between two answers
            self.broken = True
            return False
        self.task = index
        self.deadline = time.monotonic() + timeout_s
        return True

    def read_messages(self) -> list[dict] | None:
        """Complete messages that have arrived; None at end of file (the worker exited)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # flushing into a dead process's pipe: there is nobody left to read it
                    pass


class WorkerPool:
    """Up to ``workers`` warm processes; ``compare_many`` runs ``symbolic_compare`` on each pair.

    Started lazily (the first batch pays the start-up, about a second per worker for the imports).
    Safe to share between threads. After a ``fork`` the child must make its own pool: pipes are not
    shareable, so a pool used from a different process id refuses.
    """

    def __init__(self, workers: int, timeout_s: float, memory_mb: int, startup_timeout_s: float):
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self._pid = os.getpid()
        self._idle: list[_Worker] = []
        self._alive = 0
        self._closed = False
        self._cond = threading.Condition()

    # ---- checking workers in and out ---------------------------------------------------------------

    def _checkout(self, wanted: int) -> list[_Worker]:
        with self._cond:
            while True:
                if self._closed:
                    raise GradingWorkerError("the grading pool is closed")
                taken = self._idle[:wanted]
                del self._idle[: len(taken)]
                while len(taken) < wanted and self._alive < self.workers:
                    taken.append(_Worker(self.memory_mb))
                    self._alive += 1
                if taken:
                    return taken
                self._cond.wait()

    def _checkin(self, workers: Sequence[_Worker]) -> None:
        with self._cond:
            # A worker that exited (killed on an error path, or from outside) is dropped, not reused;
            # the next checkout starts a fresh one in its place.
            dead = [w for w in workers if self._closed or w.broken or w.proc.poll() is not None]
            for w in dead:
                w.kill()
            self._alive -= len(dead)
            self._idle.extend(w for w in workers if w not in dead)
            self._cond.notify_all()

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return _Worker(self.memory_mb)

    # ---- the batch loop ----------------------------------------------------------------------------

    def compare_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One Verdict per (prediction, reference), in order; each bounded by ``timeout_s`` of wall clock."""
        if os.getpid() != self._pid:
            raise GradingWorkerError("this grading pool belongs to another process (forked); create a new one")
        if not pairs:
            return []
        results: list[Verdict | None] = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        mine = self._checkout(min(len(pairs), self.workers))
        try:
            self._run(mine, pairs, pending, results)
        finally:
            self._checkin(mine)
        return [r if r is not None else Verdict(False, "not graded (internal error)") for r in results]

    def _assign(self, worker: _Worker, pairs, pending: deque, results: list) -> None:
        while pending and worker.task is None:
            index = pending.popleft()
            if not worker.send(index, *pairs[index], self.timeout_s):
                pending.appendleft(index)
                return  # the read loop will see the worker's end of file and replace it

    def _run(self, mine: list[_Worker], pairs, pending: deque, results: list) -> None:
        for w in mine:
            if w.ready:
                self._assign(w, pairs, pending, results)
        while any(w.task is not None for w in mine) or pending:
            now = time.monotonic()
            waits = [w.deadline if w.task is not None else w.started + self.startup_timeout_s for w in mine]
            with selectors.DefaultSelector() as selector:
                for slot, w in enumerate(mine):
                    if w.task is not None or not w.ready or w.broken:
                        selector.register(w.fd, selectors.EVENT_READ, slot)
                events = selector.select(timeout=max(0.0, min(waits) - now)) if selector.get_map() else []
            for key, _ in events:
                slot = key.data
                w = mine[slot]
                messages = w.read_messages()
                if messages is None:
                    mine[slot] = self._handle_exit(w, results)
                    continue
                for msg in messages:
                    if msg.get(_READY):
                        w.ready = True
                    elif "fatal" in msg:
                        w.kill()
                        raise GradingWorkerError(f"grading worker could not start: {msg['fatal']}")
                    elif w.task is not None and msg.get("i") == w.task:
                        results[w.task] = Verdict(bool(msg["eq"]), str(msg["why"]))
                        w.task = None
                self._assign(w, pairs, pending, results)
            now = time.monotonic()
            for slot, w in enumerate(mine):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = Verdict(False, f"{TIMED_OUT} {self.timeout_s:g} s (worker killed)")
                    mine[slot] = self._replace(w)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    w.kill()
                    raise GradingWorkerError(
                        f"a grading worker did not start within {self.startup_timeout_s:g} s "
                        "(grading.startup_timeout_s); the machine may be overloaded"
                    )

    def _handle_exit(self, worker: _Worker, results: list) -> _Worker:
        code = worker.proc.wait()
        if not worker.ready:
            raise GradingWorkerError(
                f"a grading worker exited with code {code} while starting; run "
                f"`{sys.executable} -m data.grading_worker` to see its error"
            )
        if worker.task is not None:
            # Typically the memory limit (grading.worker_memory_mb) hit inside sympy.
            results[worker.task] = Verdict(False, f"{WORKER_DIED} (exit code {code}) on this answer")
        return self._replace(worker)

    def close(self) -> None:
        """Stop every idle worker now; workers out on a batch stop when it returns them."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._alive -= len(idle)
            self._cond.notify_all()
        if os.getpid() == self._pid:
            for w in idle:
                w.kill()
