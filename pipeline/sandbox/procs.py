"""The parent's hands on sandbox processes: start a warm worker, ask a state to fork, kill, read the dead.

Stateless functions over pids and sockets; ``pool.SandboxPool`` decides when to call them.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.sandbox import wire
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.result import ERROR_KINDS, ExecResult

log = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = (
    "import os, sys\n"
    "fd = int(sys.argv[2])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3); os.close(fd)\n"
    "sys.path.insert(0, sys.argv[3])\n"
    "from pipeline.sandbox.worker import zygote_main\n"
    "zygote_main(sys.argv[1])\n"
)
# Tests of the refusal path set this to feature names of ``isolation.FEATURES`` the warm worker must treat
# as missing; never set in production.
SIMULATE_MISSING: tuple[str, ...] = ()
_CRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid}, as SCM_CREDENTIALS carries it


def spawn_zygote(config: SandboxConfig, scratch: str) -> tuple[subprocess.Popen, socket.socket]:
    """Start a warm worker from this interpreter; returns its process and our end of its socket."""
    c = config
    spec = {
        "scratch": scratch,
        "warm_modules": list(c.warm_modules),
        "memory_mb": c.memory_mb,
        "file_size_mb": c.file_size_mb,
        "stdout_bytes": c.stdout_bytes,
        "output_limit_bytes": c.output_limit_bytes,
        "user": c.user,
        "isolation": c.isolation,
        "workers": c.workers,
        "scratch_mb": c.scratch_mb,
        # RLIMIT_NPROC of the sandbox uid (shared by all cells): every kept state, the running steps and a
        # margin for killed states not yet reaped (zombies count). A fork bomb reaches it and no further,
        # and dies with its step.
        "nproc": c.max_live_states + 2 * c.workers + 256,
        "hidden": [_PROJECT_ROOT],  # the checkout (runs, configs) is never visible to steps
        "simulate_missing": list(SIMULATE_MISSING),
        **_outer_ids(c.user),
    }
    mine, theirs = wire.channel_pair()
    with open(os.path.join(scratch, "zygote.log"), "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-s", "-P", "-c", _BOOTSTRAP, json.dumps(spec), str(theirs.fileno()), _PROJECT_ROOT],
            env=scrubbed_env(scratch),
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,  # only until it has started: then its descriptors 0-2 point to /dev/null
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
        )
    theirs.close()
    return proc, mine


def _outer_ids(user: str | None) -> dict[str, int]:
    """The host uid/gid the sandbox's inner uid maps to: ``user`` when the pool is root, else the pool's own."""
    if os.geteuid() == 0 and user:
        entry = pwd.getpwnam(user)
        return {"outer_uid": entry.pw_uid, "outer_gid": entry.pw_gid}
    return {"outer_uid": os.geteuid(), "outer_gid": os.getegid()}


def request_fork(sock: socket.socket, seq: int, codes: list[str], cpu: int) -> socket.socket:
    """Ask the process on ``sock`` to fork a child that runs ``codes``; returns our end of the child's socket.

    Never waits: the reply (tagged ``seq``) and the child's records arrive through the pool's selector.
    Raises OSError when the request cannot be sent at once (the process is gone or not reading).
    """
    mine, theirs = wire.channel_pair()
    try:
        # The kernel attaches the sender's pid, translated into our PID namespace, to every record we read.
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        mine.setblocking(False)
        wire.send(sock, {"op": "run", "seq": seq, "codes": codes, "cpu_seconds": cpu}, fds=(theirs.fileno(),))
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine


def recv_with_pid(sock: socket.socket) -> tuple[dict | None, int | None]:
    """The next record on a child's socket and the pid of the process that sent it (None if not stated)."""
    data, anc, _flags, _addr = sock.recvmsg(wire.MAX_RECORD, socket.CMSG_SPACE(_CRED.size))
    pid = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CRED.size:
            pid = _CRED.unpack_from(payload)[0] or None
    return (wire.decode(data) if data else None), pid


def tasks_and_children(pid: int) -> tuple[int, list[int]]:
    """(threads, live child pids) of ``pid`` as the host sees them; (0, []) if it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
    return len(tids), [k for k in kids if _alive(k)]


def _stat(pid: int, missing: type[OSError] = OSError) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command name (field 3, the state, first); None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except missing:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def describe(pid: int) -> str:
    """'pid state ppid' of a process, for log lines about strays."""
    rest = _stat(pid)
    return f"{pid} gone" if rest is None else f"{pid} state {rest[0].decode()} ppid {int(rest[1])}"


def _alive(pid: int) -> bool:
    rest = _stat(pid)
    return rest is not None and rest[0] not in (b"Z", b"X")


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (shared pages split among their users); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # gone, or not ours to read: it counts as nothing rather than stopping the pool
    return 0


def kill(pid: int, sock: socket.socket, scratch: str, group: bool = True) -> None:
    """SIGKILL a sandbox process (and its process group), close its socket, remove its scratch directory."""
    for kill in (os.killpg, os.kill) if group else (os.kill,):  # the group: what the step started
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
    sock.close()
    shutil.rmtree(os.path.join(scratch, f"s{pid}"), onerror=rmtree_error)


def result_from(msg: dict, elapsed: float, replayed: int) -> ExecResult:
    ok = msg["ok"]
    if not isinstance(ok, bool):
        raise TypeError(f"ok is {type(ok).__name__}")
    kind = None if ok else str(msg["kind"])
    if kind is not None and kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return ExecResult(
        ok=ok,
        error=None if ok else str(msg["error"]),
        error_kind=kind,
        stdout=str(msg.get("stdout", "")),
        stderr=str(msg.get("stderr", "")),
        duration=elapsed,
        replayed=replayed,
    )


def exit_status(pid: int) -> int | None:
    """The wait status of a dead sandbox process, read from its zombie's /proc entry (field 52, exit_code).

    Its parent is a state or the zygote, not us, so we cannot waitpid it; the zombie stays until that
    parent reaps it at its next fork request. That request is usually sent after this read (the reactor
    handles the end of stream first); when it was not, the status is unknown and the error says so.
    """
    for _ in range(20):  # the socket closes a moment before the process becomes a zombie
        rest = _stat(pid, FileNotFoundError)
        if rest is None:
            return None
        if rest[0] == b"Z" and len(rest) >= 50:
            return int(rest[49])
        time.sleep(0.005)
    return None


def scrubbed_env(scratch: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",  # set/dict-of-str order identical across pools: replays and reruns match
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",  # no BLAS threads: forking a threaded process is unsafe
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


SCRATCH_PREFIX = "open-rstar-sandbox-"


def _start_ticks(pid: int) -> int | None:
    """``pid``'s start time (clock ticks after boot, /proc/PID/stat field 22); None when it is gone."""
    rest = _stat(pid)
    return int(rest[19]) if rest is not None and len(rest) > 19 and rest[0] not in (b"Z", b"X") else None


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def scratch_prefix() -> str:
    """The prefix of this process's scratch directory names: ``open-rstar-sandbox-NS-PID-START-``, so a later pool
    can tell that the pool which made one has died (``sweep_stale_scratch``)."""
    pid = os.getpid()
    return f"{SCRATCH_PREFIX}{_pid_namespace()}-{pid}-{_start_ticks(pid) or 0}-"


def sweep_stale_scratch(parent: str) -> list[str]:
    """Remove scratch directories under ``parent`` whose pool's process is gone: a pool killed by SIGKILL (or
    an OOM kill) cannot remove its own. Only names made by ``scratch_prefix`` in this PID namespace count; a
    directory whose process is alive (same pid and start time), from another namespace, or named otherwise
    (older releases) is left. Returns the directories removed."""
    ns, removed = str(_pid_namespace()), []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SCRATCH_PREFIX):
            continue
        parts = name[len(SCRATCH_PREFIX) :].split("-", 3)
        if len(parts) != 4 or parts[0] != ns or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        if ns == "0" or parts[2] == "0" or _start_ticks(int(parts[1])) == int(parts[2]):
            continue  # alive, or no namespace / start time to tell it by
        path = os.path.join(parent, name)
        try:
            shutil.rmtree(path)
        except OSError as e:
            log.debug("sandbox: could not remove stale scratch %s: %s", path, e)
            continue
        removed.append(path)
    return removed


def rmtree_error(func: Callable, path: str, exc_info: tuple) -> None:
    if isinstance(exc_info[1], FileNotFoundError):
        return  # the process died before creating its directory, or it is already removed
    log.warning("sandbox: could not remove %s (%s: %s)", path, func.__name__, exc_info[1])


def tail(path: str, chars: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return "(no log)"
    return text[-chars:].strip() or "(empty)"
