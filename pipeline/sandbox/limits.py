"""Child-side containment inside the process: rlimits, the audit guard, and cleanup of descendants.

Under ``isolation: kernel`` (the default) security rests on ``isolation`` (namespaces, a read-only root,
seccomp, Landlock, hard rlimits set once per cell). What is here is the first filter on top of it:

* Per step, a soft RLIMIT_CPU and a soft RLIMIT_NPROC of 0 (no fork, no thread) while model code runs;
  a private process group. Under ``isolation: process`` also RLIMIT_AS / FSIZE / CORE and, when the pool
  is root, a switch to an unprivileged user (skipped, with a warning, if that user cannot read the
  interpreter's files).
* The audit guard (PEP 578 hook, armed only while model code runs): refuses process creation, signals to
  other processes, sockets, rlimit changes, loading native libraries, writes outside the scratch directory
  and reads of other processes' environments, raising ``SandboxViolation`` in the step. It turns the
  common accidents into clear errors. It is not a security boundary (Python code can reach the flag that
  arms it, and the soft limits can be raised back), which is why the kernel layer exists.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

# Events refused outright while armed (exact names, from the CPython audit events table).
_DENIED = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "os.setuid",
        "os.chroot",
        "sys.remote_exec",
    }
)
_DENIED_PREFIXES = ("socket.", "_thread.start", "webbrowser.")
# Filesystem mutations: allowed only on paths inside the scratch directory. Value = how many leading
# arguments are paths.
_PATH_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.rename": 2,
    "os.symlink": 2,
    "os.link": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.truncate": 1,
    "os.utime": 1,
    "os.chflags": 1,
    "os.mkfifo": 1,
    "os.mknod": 1,
    "shutil.rmtree": 1,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class SandboxViolation(PermissionError):
    """Raised inside a step for an operation the sandbox does not allow."""


class _Guard:
    """The audit hook's switch. One per process; inherited by every fork."""

    def __init__(self) -> None:
        self.armed = False
        self.scratch = "/"
        self._busy = False  # the hook itself calls os.path functions that may raise events

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed or self._busy:
            return
        if event in _DENIED or event.startswith(_DENIED_PREFIXES):
            raise SandboxViolation(f"the sandbox does not allow {event}")
        if event == "open":
            self._check_open(args)
        elif event in _PATH_EVENTS:
            for path in args[: _PATH_EVENTS[event]]:
                self._check_write(event, path)

    def _check_open(self, args: tuple) -> None:
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(path, int) or path is None:
            return  # an already open descriptor
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing:
            self._check_write("open for writing", path)
            return
        real = self._resolve(path)
        parts = real.split("/")
        if len(parts) >= 4 and parts[1] == "proc" and parts[3] in ("environ", "mem", "auxv"):
            raise SandboxViolation(f"the sandbox does not allow reading {real}")

    def _check_write(self, what: str, path: object) -> None:
        if isinstance(path, int):
            return
        real = self._resolve(path)
        if real == os.devnull or real == self.scratch or real.startswith(self.scratch + os.sep):
            return
        raise SandboxViolation(f"the sandbox does not allow {what} outside its scratch directory: {real}")

    def _resolve(self, path: object) -> str:
        self._busy = True
        try:
            p = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
            return os.path.realpath(p)
        finally:
            self._busy = False


GUARD = _Guard()


def install_guard(scratch: str) -> None:
    GUARD.scratch = os.path.realpath(scratch)
    sys.addaudithook(GUARD)
    # Two ways to start a process or thread raise no audit event in CPython 3.11: the fork+exec used by
    # multiprocessing's spawn and forkserver, and starting a thread. Guard them by wrapping the functions
    # (RLIMIT_NPROC stops both at the kernel when the sandbox is not root).
    import _posixsubprocess
    import _thread

    _posixsubprocess.fork_exec = _refused_while_armed(_posixsubprocess.fork_exec, "_posixsubprocess.fork_exec")
    _thread.start_new_thread = _refused_while_armed(_thread.start_new_thread, "starting a thread")
    if "threading" in sys.modules:  # it bound its own reference at import
        threading = sys.modules["threading"]
        threading._start_new_thread = _refused_while_armed(threading._start_new_thread, "starting a thread")


def _refused_while_armed(fn, what: str):
    def guarded(*args, **kwargs):
        if GUARD.armed:
            raise SandboxViolation(f"the sandbox does not allow {what}")
        return fn(*args, **kwargs)

    return guarded


def thread_count() -> int:
    """Threads of this process (the kernel's count, so threads started behind Python's back show too)."""
    return len(os.listdir("/proc/self/task"))


def apply_static_limits(memory_mb: int, file_size_mb: int) -> None:
    """Limits that hold for the whole life of every sandbox process (set once in the warm worker)."""
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * mb, memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_mb * mb, file_size_mb * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # An oversized write then fails with OSError(EFBIG) in the step instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def enter_step(cpu_seconds: int) -> None:
    """Before model code: a CPU budget, and no new processes or threads (soft limits, restored after)."""
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    used = int(sum(os.times()[:2]))
    resource.setrlimit(resource.RLIMIT_CPU, (used + cpu_seconds, cpu_hard))
    _, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, nproc_hard))
    GUARD.armed = True


def leave_step() -> None:
    """After model code: lift the per-step soft limits again so this state can fork its children."""
    GUARD.armed = False
    for res in (resource.RLIMIT_CPU, resource.RLIMIT_NPROC):
        _, hard = resource.getrlimit(res)
        resource.setrlimit(res, (hard, hard))


def become_subreaper() -> None:
    """Orphaned sandbox processes are re-parented to this process (not init), so it can find and kill them."""
    import ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def drop_privileges(user: str | None) -> tuple[str, str | None]:
    """Switch to ``user`` when running as root. Returns (the user the sandbox runs as, why root was kept).

    Root is kept, with the reason returned for the pool to log, when ``user`` could not read the
    interpreter's own files (e.g. a pyenv Python under /root): every lazy import would fail otherwise.
    """
    import pwd

    if os.geteuid() != 0 or user is None:
        return pwd.getpwuid(os.geteuid()).pw_name, None
    entry = pwd.getpwnam(user)  # KeyError names the missing user; the pool reports it
    os.setgroups([])
    blocked = _unreadable_as(entry.pw_uid, entry.pw_gid, [p for p in sys.path if p and os.path.isdir(p)])
    if blocked:
        return "root", f"user {user!r} cannot read {blocked[0]} (the interpreter's files), so the sandbox runs as root"
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    return entry.pw_name, None


def _unreadable_as(uid: int, gid: int, paths: list[str]) -> list[str]:
    os.setegid(gid)
    os.seteuid(uid)
    try:
        return [p for p in paths if not os.access(p, os.R_OK | os.X_OK, effective_ids=True)]
    finally:
        os.seteuid(0)
        os.setegid(0)


def descendants(root_pid: int) -> list[int]:
    """Pids of every live process below ``root_pid``, read from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we listed /proc
        # Fields after the parenthesised command (which may hold spaces): state, ppid, ...
        rest = stat[stat.rfind(b")") + 2 :].split()
        if rest[0] == b"Z":
            continue
        children.setdefault(int(rest[1]), []).append(int(name))
    out: list[int] = []
    frontier = [root_pid]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            out.append(child)
            frontier.append(child)
    return out


def kill_descendants() -> int:
    """SIGKILL every process below this one (the warm worker's dead man's switch). Returns how many."""
    killed = 0
    for _ in range(3):  # re-parenting of orphans to us can race with one /proc scan
        pids = descendants(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass  # already gone
    return killed
