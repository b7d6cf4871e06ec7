"""Live states: the bounded LRU of kept interpreter states, the memory budget, and the cells they live in.

A successful step's process stays alive as the state of its node, in a bounded LRU keyed by
(tree_id, node_key) (``max_live_states``); a failed step's process is killed at once. Siblings are separate
processes, so a step sees its ancestors' names and nobody else's. A pool-wide budget on the proportional
memory (PSS) of the kept states and running steps (``memory_budget_mb``) evicts the least recently used
states; PSS is read at most once every ``_MEMORY_CHECK_EVERY`` seconds, less often when reading it is slow.

Under kernel isolation every process belongs to a *cell*: a process tree forked from the zygote (a tree's
first step, or a rebuild) in its own PID namespace, whose pid 1 (the cell's init) forks the steps (see
``isolation`` and ``worker``). Killing a cell's init kills all of it; a cell dies when its last state and job
leave it. A step that left processes behind (a ``setsid``'d grandchild re-parented to the cell's init)
takes its whole cell, states included, down with it.

A mixin of ``SandboxPool``: its methods run on the reactor thread and reach the other parts through ``self``.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections import OrderedDict
from typing import Any

from pipeline.sandbox import procs
from pipeline.sandbox.records import Job, State

_MEMORY_CHECK_EVERY = 1.0  # seconds between PSS readings of the kept states (memory_budget_mb)


class LiveStates:
    def _init_states(self) -> None:
        self._states: OrderedDict[tuple[str, str], State] = OrderedDict()
        self._cells: dict[int, set] = {}  # cell init pid -> its members (kept state keys and jobs)
        self._next_memory_check = 0.0
        self._unsettled: dict[int, float] = {}  # cell -> until when an abandoned fork may still be running in it
        self._killed: dict[int, float] = {}  # pid -> when the pool sent it SIGKILL

    # ----- states -----------------------------------------------------------------------------------

    def _keep_state(self, job: Job) -> None:
        assert job.key is not None and job.sock is not None
        if job.key in self._states:  # the same node executed twice: the newer state wins
            self._drop_state(job.key)
        state = State(job.pid, job.sock, job.key[0], job.key, job.cell)
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

    # ----- cells (kernel isolation) -----------------------------------------------------------------

    def _join_cell(self, job: Job) -> None:
        if job.cell is not None:
            self._cells.setdefault(job.cell, set()).add(job)

    def _leave_cell(self, member: Any) -> None:
        cell = member.cell
        if cell is None or cell not in self._cells:
            return
        self._cells[cell].discard(member.key if isinstance(member, State) else member)
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

    def _strays_in_cell(self, job: Job) -> list[int]:
        """Children of the cell's init that are neither states nor running steps (a setsid'd grandchild)."""
        if job.cell is None or any(isinstance(m, Job) and not m.pid for m in self._cells.get(job.cell, ())):
            return []  # a fork in flight: its process is not known yet, so nothing can be called a stray
        if self._unsettled.get(job.cell, 0.0) > time.monotonic():
            return []
        known = {m.pid for m in self._cells.get(job.cell, ()) if isinstance(m, Job)}
        known |= {s.pid for s in self._states.values() if s.cell == job.cell}
        return [k for k in procs.tasks_and_children(job.cell)[1] if k not in known and k not in self._killed]

    def _kill_strays(self, job: Job, strays: list[int]) -> None:
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
