"""The sandbox processes: a warm worker (zygote) and the per-node interpreter states forked from it.

Started by the pool as ``python -s -P -c <bootstrap>`` with a scrubbed environment and one inherited
descriptor, a SEQPACKET socket to the pool. The zygote imports the warm modules, sets the static limits,
drops root, installs the audit guard, and then only forks. Every process here runs the same loop:

    wait for {"op": "run", "codes": [...]} with a fresh socket attached
    fork; the child takes the socket, runs the codes in a copy of this process's namespace, reports,
    and, if the step succeeded, stays alive as the new state, running this same loop.

So a state is a process whose memory *is* the interpreter state after its step: a child step costs one
fork (copy-on-write) plus its own code, whatever the depth. The zygote's namespace is empty, so a child
of the zygote is a fresh interpreter; a rebuild after a miss is a child of the zygote that replays the
path's codes first. End of stream on a process's socket means the pool is gone: it exits (the zygote
first kills everything below it).
"""

from __future__ import annotations

import builtins
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
import time

from pipeline.sandbox import confine, isolation, limits, wire
from pipeline.sandbox.result import (
    EXIT,
    FORBIDDEN,
    MEMORY,
    OUTPUT,
    REPLAY,
    RUNTIME,
    SYNTAX,
    truncation_marker,
)

CHANNEL_FD = 3  # every sandbox process talks to the pool on this descriptor, and has no others open
_MAX_ERROR_CHARS = 500
# CPU seconds a state may spend after its step, forking its children (hard limit = step budget + this).
# The wall-clock deadline in the pool is what stops a step; the CPU limit is the kernel's backstop.
STATE_CPU_HEADROOM = 60
_REAP_TICK = 1.0  # seconds between reaping rounds of an idle state (it also reaps at every request)
_REAP_AGE = 0.5  # seconds a child stays a zombie before it is reaped (the pool reads its status meanwhile)


class OutputLimitExceeded(BaseException):
    """Raised from print() past ``output_limit_bytes``. BaseException: ``except Exception`` can't swallow it."""


class _Capture:
    """A write-only text stream for sys.stdout / sys.stderr that keeps the first ``keep`` chars."""

    def __init__(self, keep: int, limit: int):
        self.keep, self.limit = keep, limit
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0
        self.exceeded = False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.total += len(s)
        if self.kept < self.keep:
            piece = s[: self.keep - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)
        if self.total > self.limit:
            self.exceeded = True
            raise OutputLimitExceeded(f"more than {self.limit} characters of output")
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def text(self) -> str:
        out = "".join(self.parts)
        return out + truncation_marker(self.total - self.kept) if self.total > self.kept else out


class _Settings:
    """What the zygote learned at start; inherited unchanged by every fork."""

    scratch = "/tmp"
    kernel = False  # isolation: kernel (namespaces, seccomp, Landlock) or process (rlimits and the guard)
    spec: dict = {}
    death_r = death_w = -1  # a pipe whose write end only the warm worker holds: EOF on death_r = it is gone
    stdout_bytes = 4096
    output_limit = 1 << 20
    recursion_limit = 1000
    signal_handlers: dict[int, object] = {}
    # random's global generator and its state accessors, captured before any step could replace them.
    rng: object = None
    rng_get = rng_set = None


def _fresh_namespace() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins}


def _describe(exc: BaseException) -> tuple[str, str]:
    """(kind, "Type: message") of an exception raised by a step; called while the guard is still armed."""
    name = type(exc).__name__
    try:
        msg = str(exc)
    except BaseException:  # noqa: BLE001 - a step's own __str__ may raise anything; the type name is enough
        msg = "<unprintable>"
    if isinstance(exc, SyntaxError):
        return SYNTAX, f"{name}: {exc.msg} (line {exc.lineno})"
    if isinstance(exc, MemoryError):
        return MEMORY, f"MemoryError: {msg}" if msg else "MemoryError"
    if isinstance(exc, OutputLimitExceeded):
        return OUTPUT, f"OutputLimit: {msg}"
    if isinstance(exc, SystemExit):
        return EXIT, f"SystemExit: {exc.code}"
    if isinstance(exc, limits.SandboxViolation):
        return FORBIDDEN, f"PermissionError: {msg}"
    return RUNTIME, f"{name}: {msg}" if msg else name


def _restore_process_state() -> None:
    """Undo what a step may have changed that is not interpreter state: stdio, timers, handlers, limits."""
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    sys.stdin = sys.__stdin__
    sys.setrecursionlimit(_Settings.recursion_limit)
    for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
        signal.setitimer(timer, 0)
    for sig, handler in _Settings.signal_handlers.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def _run_one(code: str, ns: dict, index: int, cpu_seconds: int) -> dict:
    out = _Capture(_Settings.stdout_bytes, _Settings.output_limit)
    err = _Capture(_Settings.stdout_bytes, _Settings.output_limit)
    kind = error = None
    try:
        compiled = compile(code, f"<step {index}>", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: source with NUL bytes
        kind, error = _describe(exc)
        return {"ok": False, "kind": SYNTAX, "error": error[:_MAX_ERROR_CHARS], "stdout": "", "stderr": ""}
    limits.enter_step(cpu_seconds)
    sys.stdout, sys.stderr = out, err
    try:
        exec(compiled, ns)
    except BaseException as exc:  # noqa: BLE001 - any exception is the step's result, reported below
        kind, error = _describe(exc)
    finally:
        limits.leave_step()
        _restore_process_state()
    if kind is None and (out.exceeded or err.exceeded):  # the step caught OutputLimitExceeded itself
        kind, error = OUTPUT, f"OutputLimit: more than {_Settings.output_limit} characters of output"
    if kind is None and (threads := limits.thread_count()) > 1:
        # A state must be single-threaded: its children are forks, and a fork keeps only the calling thread.
        kind, error = FORBIDDEN, f"PermissionError: the step left {threads - 1} extra thread(s) running"
    return {
        "ok": kind is None,
        "kind": kind,
        "error": None if error is None else error[:_MAX_ERROR_CHARS],
        "stdout": out.text(),
        "stderr": err.text(),
    }


def _execute(codes: list[str], ns: dict, cpu_seconds: int) -> dict:
    """Run the replayed history (all but the last) and then the step; report the step's outcome."""
    start = time.perf_counter()
    for i, code in enumerate(codes):
        res = _run_one(code, ns, i, cpu_seconds)
        if not res["ok"] and i < len(codes) - 1:
            res["kind"] = REPLAY
            res["error"] = f"ReplayError: history step {i + 1} of {len(codes) - 1} failed on rebuild: {res['error']}"
            break
    res["exec_s"] = time.perf_counter() - start
    return res


def _child(sock_fd: int, msg: dict, ns: dict, parent_chan: socket.socket) -> None:
    """In a freshly forked process: become the new state for ``msg`` (never returns)."""
    status = 70  # EX_SOFTWARE: setup failed before a result was sent; the pool reports "Killed: ... status 70"
    try:
        os.setpgid(0, 0)  # its own process group: the pool kills it and anything it started in one call
        parent_chan.detach()  # fd 3 is about to be replaced; the old object must not close it later
        os.dup2(sock_fd, CHANNEL_FD)
        os.closerange(CHANNEL_FD + 1, os.sysconf("SC_OPEN_MAX"))  # includes sock_fd and the parent's others
        chan = socket.socket(fileno=CHANNEL_FD)
        # First record: the pool reads this process's pid, as the kernel states it (SO_PASSCRED), from it.
        wire.send(chan, {"hello": True})
        workdir = os.path.join(_Settings.scratch, f"s{os.getpid()}")
        os.mkdir(workdir, 0o700)
        os.chdir(workdir)
        if ns.get("__sandbox_root__"):  # the zygote's marker: a child of it starts from nothing
            ns = _fresh_namespace()
        codes = list(msg["codes"])
        if _Settings.kernel:  # a fresh process starts at 0 CPU seconds; soft = hard, never raised again
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            cpu = int(msg["cpu_seconds"]) * len(codes) + STATE_CPU_HEADROOM
            cpu = cpu if hard == resource.RLIM_INFINITY else min(cpu, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        result = _execute(codes, ns, int(msg["cpu_seconds"]))
        wire.send(chan, result)
        status = 0
        if result["ok"]:
            _serve(chan, ns)
    finally:
        os._exit(status)


class _Reaper:
    """Collects exited children, but only those that have been zombies for ``_REAP_AGE`` seconds: until
    then the pool may still be reading the exit status from the zombie's /proc entry."""

    def __init__(self) -> None:
        self.first_seen: dict[int, float] = {}
        self.last = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < _REAP_AGE / 2:
            return  # a state with many children pays for reading their /proc entries at most this often
        self.last = now
        zombies = {}
        for pid in _children():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2 :].split()[0] == b"Z":
                zombies[pid] = self.first_seen.get(pid, now)
        for pid, seen in list(zombies.items()):
            if now - seen >= _REAP_AGE:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass  # reaped already
                del zombies[pid]
        self.first_seen = zombies


def _children() -> list[int]:
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return out


def _serve(chan: socket.socket, ns: dict) -> None:
    """The state loop: fork a child per "run" request until the pool closes the channel."""
    reaper = _Reaper()
    zygote = _Settings.kernel and bool(ns.get("__sandbox_root__"))
    while True:
        idle_work = zygote and len(_Spare.cells) < _Spare.target
        ready, _, _ = select.select([chan], [], [], 0.0 if idle_work else _REAP_TICK)
        if not ready:
            if idle_work and not _make_spare(ns, chan):
                wire.send(chan, {"spare": _Spare.pids()})
            reaper.tick()
            continue
        msg, fds = wire.recv_with_fds(chan)
        if msg is None:
            return
        reaper.tick()  # killed children count against RLIMIT_NPROC until reaped
        seq = msg.get("seq")
        if msg.get("op") != "run" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            wire.send(
                chan, {"seq": seq, "error": f"unknown request {json.dumps(msg)[:200]} with {len(fds)} descriptors"}
            )
            continue
        if _Settings.kernel and ns.get("__sandbox_root__"):
            reply = _new_cell(fds[0], msg, ns, chan)
            os.close(fds[0])
            wire.send(chan, {"seq": seq, **reply})
            if not _Spare.cells:
                _make_spare(ns, chan)  # after the reply, so the step already runs meanwhile
            wire.send(chan, {"spare": _Spare.pids()})  # for the pool's accounting of processes
            continue
        rng_state = _Settings.rng_get(_Settings.rng) if _Settings.rng is not None else None
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            wire.send(chan, {"seq": seq, "error": f"fork failed: {exc}"})
            continue
        if pid == 0:
            if rng_state is not None:  # random re-seeds itself from urandom in every fork; undo that
                _Settings.rng_set(_Settings.rng, rng_state)
            _child(fds[0], msg, ns, chan)
        os.close(fds[0])
        wire.send(chan, {"seq": seq, "pid": pid})


class _Spare:
    """Cells made ahead of need: each init waits on its ``ctl`` socket for the request its first step will
    run, so a tree's first step costs one fork like any other step. The warm worker makes them while it is
    idle (up to ``target``: one per worker), and one right after it uses the last."""

    cells: list[tuple[int, socket.socket]] = []  # (init pid, control socket)
    target = 1

    @staticmethod
    def pids() -> list[int]:
        return [pid for pid, _ in _Spare.cells]


def _new_cell(sock_fd: int, msg: dict, ns: dict, chan: socket.socket) -> dict:
    """In the warm worker: hand ``msg`` to a spare cell (see ``isolation``); returns the reply for the pool.

    warm worker -> X (new PID and mount namespaces, tmpfs on /tmp; exits at once) -> Y, the cell's init
    (pid 1: mounts the cell's /proc, waits for its request, forks the step's process, which confines itself,
    then only reaps, and dies when the warm worker does).
    """
    for _attempt in range(2):  # a spare that died meanwhile is replaced once
        if not _Spare.cells:
            error = _make_spare(ns, chan)
            if error:
                return {"error": error}
        pid, ctl = _Spare.cells.pop(0)
        try:
            wire.send(ctl, msg, fds=(sock_fd,))
        except OSError:
            continue
        finally:
            ctl.close()
        return {"pid": pid, "cell": pid}
    return {"error": "two spare cells in a row died before their first step"}


def _make_spare(ns: dict, chan: socket.socket) -> str:
    """Start the next spare cell; returns an error message, or "" once its init's pid is known."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    rng_state = _Settings.rng_get(_Settings.rng) if _Settings.rng is not None else None
    try:
        x = os.fork()
    except OSError as exc:
        for fd in (r, w):
            os.close(fd)
        mine.close()
        theirs.close()
        return f"fork failed: {exc}"
    if x == 0:
        report = b"error: the cell did not start"
        try:
            os.close(r)
            os.close(_Settings.death_w)
            mine.close()
            isolation.enter_cell(int(_Settings.spec["scratch_mb"]))
            y = os.fork()
            if y == 0:
                os.close(w)
                _cell_init(theirs, ns, chan, rng_state)
            report = str(y).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the pool as this fork's error
            report = f"error: {type(exc).__name__}: {exc}".encode()[:1000]
        finally:
            os.write(w, report)
            os._exit(0)
    os.close(w)
    theirs.close()
    with os.fdopen(r, "rb") as f:
        report = f.read().decode(errors="replace")
    os.waitpid(x, 0)
    if not report.isdigit():
        mine.close()
        return report
    _Spare.cells.append((int(report), mine))
    return ""


def _cell_init(ctl: socket.socket, ns: dict, chan: socket.socket, rng_state: object) -> None:
    """Pid 1 of a cell: mount its /proc, wait for the first request, fork the step's process, then only
    reap until the warm worker is gone (never returns)."""
    status = 70
    try:
        chan.close()  # the warm worker's channel to the pool: the init has nothing to say to it
        isolation.mount_cell_proc()
        ready, _, _ = select.select([ctl, _Settings.death_r], [], [])
        msg, fds = wire.recv_with_fds(ctl) if ctl in ready else (None, [])
        if msg is None or len(fds) != 1:
            os._exit(0)  # the warm worker is gone, or never used this spare
        pid = os.fork()
        if pid == 0:
            if rng_state is not None:  # random re-seeds itself from urandom in every fork; undo that
                _Settings.rng_set(_Settings.rng, rng_state)
            spec = _Settings.spec
            try:
                confine.confine(spec["memory_mb"], spec["file_size_mb"], spec["nproc"])
            except BaseException as exc:  # noqa: BLE001 - the step must not run unconfined
                os.dup2(fds[0], CHANNEL_FD)
                c = socket.socket(fileno=CHANNEL_FD)
                wire.send(c, {"hello": True})
                wire.send(c, {"ok": False, "kind": "internal", "error": f"SandboxError: confine failed: {exc}"})
                os._exit(70)
            _child(fds[0], msg, ns, ctl)
        os.close(fds[0])
        ctl.close()
        reaper = _Reaper()
        while True:
            ready, _, _ = select.select([_Settings.death_r], [], [], _REAP_TICK)
            if ready and not os.read(_Settings.death_r, 1):
                break  # the warm worker is gone: end the cell (the kernel kills every process in it)
            reaper.tick()
        status = 0
    finally:
        os._exit(status)


def _import_warm(names: list[str]) -> list[str]:
    loaded = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            continue  # optional package not installed (numpy): steps that import it fail on their own
        loaded.append(name)
    return loaded


def _seed_randomness() -> None:
    # Every fresh state inherits this state unchanged (the zygote never runs steps), so a replay on a miss
    # draws the same numbers as the original run, and reruns draw the same numbers across pools.
    import random

    random.seed(0)
    _Settings.rng, _Settings.rng_get, _Settings.rng_set = random._inst, random.Random.getstate, random.Random.setstate
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


def zygote_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    chan = socket.socket(fileno=CHANNEL_FD)
    try:
        warm = _import_warm(spec["warm_modules"])
        _seed_randomness()
        _Settings.scratch = spec["scratch"]
        _Settings.stdout_bytes = spec["stdout_bytes"]
        _Settings.output_limit = spec["output_limit_bytes"]
        _Settings.recursion_limit = sys.getrecursionlimit()
        _Settings.spec = spec
        limits.apply_static_limits(spec["memory_mb"], spec["file_size_mb"])
        limits.become_subreaper()
        if spec["isolation"] == "kernel":
            isolation.simulate_missing(spec.get("simulate_missing", []))
            confine.require_all()  # loads libseccomp while the host's library paths are still visible
            isolation.enter_zygote(spec["scratch"], spec["outer_uid"], spec["outer_gid"], hidden=tuple(spec["hidden"]))
            _Settings.kernel, _Settings.scratch = True, "/tmp"
            os.environ.update({"HOME": "/tmp", "TMPDIR": "/tmp"})
            _Settings.death_r, _Settings.death_w = os.pipe()  # every fork closes the write end at once
            user, kept_root = f"uid {isolation.INNER_UID} in a user namespace", None
        else:
            user, kept_root = limits.drop_privileges(spec["user"])
        limits.install_guard(_Settings.scratch)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # C-level writes and reads of model code go nowhere; Python's are captured
            os.dup2(devnull, fd)
        os.close(devnull)
        _Settings.signal_handlers = {s: h for s in signal.valid_signals() if (h := signal.getsignal(s)) is not None}
        gc.collect()
        gc.freeze()  # keep the collector off the warm modules' pages so forks share them copy-on-write
    except BaseException as exc:  # noqa: BLE001 - reported to the pool, which raises it to the user
        wire.send(
            chan, {"ready": False, "error": f"{type(exc).__name__}: {exc}", "missing": getattr(exc, "feature", None)}
        )
        os._exit(1)
    if _Settings.kernel:
        _Spare.target = max(1, int(spec["workers"]))
        error = _make_spare({"__sandbox_root__": True}, chan)
        if error:
            wire.send(chan, {"ready": False, "error": f"the first cell did not start: {error}"})
            os._exit(1)
    wire.send(
        chan,
        {"ready": True, "pid": os.getpid(), "warm": warm, "user": user, "warning": kept_root, "spare": _Spare.pids()},
    )
    try:
        _serve(chan, {"__sandbox_root__": True})
    finally:
        limits.kill_descendants()  # process isolation; with kernel isolation the cells end with this process
        os._exit(0)
