"""Job bookkeeping: accept a step, hold it until it may run, start it, and finish it exactly once.

Every step runs in a process forked either from the live state of its parent node (a *hit*: one fork, one
step) or, when that state is gone, from the zygote with the path's code replayed first (a *miss*). A step
whose parent is itself queued or running waits for it (``_blocked``) and forks from its state instead of
replaying. At most ``workers`` steps execute at once; each gets a wall-clock deadline (``timeout`` per
executed step, plus ``_FORK_ALLOWANCE``), after which the reactor kills it. A worker that dies is reported as
a ``killed`` error for the step it was running, never retried. After a step the pool looks at it from outside
(/proc): a step that left threads or processes behind is refused (``forbidden``) and, under kernel isolation,
its whole cell is killed.

A job is *outstanding* from ``_accept`` until ``_forget`` (by way of ``_finish``, or directly for one
cancelled while it waited or failed because no zygote starts); ``_inflight`` counts them per node key, which
is what a child waits on.

A mixin of ``SandboxPool``: its methods run on the reactor thread and reach the other parts through ``self``.
"""

from __future__ import annotations

import itertools
import logging
import math
import selectors
import time
from collections import Counter, deque

from pipeline.sandbox import procs
from pipeline.sandbox.records import Job, State, Zygote
from pipeline.sandbox.result import FORBIDDEN, ExecResult, failure

log = logging.getLogger("pipeline.sandbox.pool")  # the pool's one logger, whichever file holds the code

_FORK_ALLOWANCE = 0.5  # seconds added to a step's deadline for the fork and the result's trip back


class Dispatcher:
    def _init_jobs(self) -> None:
        self._pending: deque[Job] = deque()
        self._running: set[Job] = set()
        self._blocked: dict[tuple[str, str], list[Job]] = {}
        self._inflight: Counter[tuple[str, str]] = Counter()
        self._outstanding: set[Job] = set()  # accepted and not finished, wherever it waits
        self._oneshot = itertools.count()
        self._seq = itertools.count(1)
        self._forks: dict[int, Job] = {}  # sequence number -> job whose fork reply is awaited

    def _accept(self, job: Job) -> None:
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

    def _start(self, job: Job) -> None:
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

    def _ask_fork(self, job: Job, forker: State | Zygote, codes: list[str], cpu: int) -> bool:
        """Send the fork request; False when ``forker`` cannot take it now (a state is then dropped)."""
        job.seq = next(self._seq)
        try:
            job.sock = procs.request_fork(forker.sock, job.seq, codes, cpu)
        except OSError as exc:  # BlockingIOError: it does not read its socket; else it is gone
            if isinstance(forker, State):
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

    def _abandon(self, job: Job) -> None:
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

    def _complete(self, job: Job, result: ExecResult) -> None:
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

    def _finish(self, job: Job, result: ExecResult) -> None:
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

    def _forget(self, job: Job) -> None:
        assert job.key is not None
        self._outstanding.discard(job)
        self._inflight[job.key] -= 1
        if self._inflight[job.key] <= 0:
            del self._inflight[job.key]
            self._pending.extendleft(reversed(self._blocked.pop(job.key, [])))
