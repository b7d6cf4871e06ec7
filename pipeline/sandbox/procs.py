"""The parent's hands on sandbox processes: start a warm worker, ask a state to fork, kill, read the dead.

Stateless functions over pids and sockets; ``pool.SandboxPool`` decides when to call them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
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
FORK_REPLY_TIMEOUT = 10.0  # seconds for an idle state to fork and answer; it does nothing else


class ForkFailed(Exception):
    def __init__(self, reason: str, dead: bool):
        super().__init__(reason)
        self.dead = dead  # the forking process is gone (else it answered with an error)


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


def fork(sock: socket.socket, codes: list[str], cpu: int) -> tuple[int, socket.socket]:
    """Ask the process on ``sock`` to fork a child that runs ``codes``; returns (child pid, our end of its socket)."""
    mine, theirs = wire.channel_pair()
    try:
        wire.send(sock, {"op": "run", "codes": codes, "cpu_seconds": cpu}, fds=(theirs.fileno(),))
        sock.settimeout(FORK_REPLY_TIMEOUT)
        reply = wire.recv(sock)
    except (OSError, wire.ProtocolError) as exc:
        mine.close()
        raise ForkFailed(f"{type(exc).__name__}: {exc}", dead=True) from exc
    finally:
        theirs.close()
    if reply is None or not isinstance(reply.get("pid"), int):
        mine.close()
        raise ForkFailed(str((reply or {}).get("error", "end of stream")), dead=reply is None)
    return reply["pid"], mine


def kill(pid: int, sock: socket.socket, scratch: str) -> None:
    """SIGKILL a sandbox process and its process group, close its socket, remove its scratch directory."""
    for kill in (os.killpg, os.kill):  # the group: whatever the step started; the pid: if it left it
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
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            return None
        rest = stat[stat.rfind(b")") + 2 :].split()
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
