"""Kernel isolation of sandbox processes: namespaces, a read-only root, seccomp, Landlock, hard rlimits.

Everything here runs inside sandbox processes (the warm worker and what it forks), never in the pool, and
through ctypes on libc and libseccomp (Python 3.11 has no ``os.unshare``). Three places apply it:

* ``enter_zygote``: once, in the warm worker. A user namespace (one non-root uid, 1000 inside, mapped to
  ``nobody`` outside when the pool is root, else to the pool's own uid), a network namespace with nothing
  but a loopback that is down, and a mount namespace whose root is a fresh tmpfs holding read-only binds of
  only what Python needs: /usr and the /lib links, the interpreter's prefixes and sys.path directories,
  five /dev nodes, ld.so.cache. Nothing else of the host is visible: of /root and /work only those
  directories exist; /home, /etc (but ld.so.cache, localtime), /sys and the project checkout do not (a
  virtual environment inside the checkout, such as make setup's .venv, is bound: it is the interpreter's own).
* ``enter_cell``: per sandbox cell, i.e. per process tree forked from the warm worker (a tree's first
  step, or a rebuild). A PID namespace whose init is a tiny reaper forked from the worker, a private mount
  namespace with its own tmpfs on /tmp (the only writable place) and its own /proc (only the cell's
  processes). When the init dies, the kernel kills every process of the cell.
* ``confine.confine`` (its own module): in the cell's first step process, before any model code,
  inherited by every state and step below it and impossible to undo: setuid to the inner uid, every capability dropped, no_new_privs,
  hard rlimits (soft = hard), Landlock (read-only everywhere but /tmp, no TCP, no abstract unix sockets or
  signals outside the cell), and a seccomp filter that denies what a math step never needs.

``probe()`` answers which of these the kernel offers; the pool refuses to start without them unless the
config says ``isolation: process``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
_NS_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2

# x86_64 and aarch64 share these numbers (the "generic" table) for the new syscalls used here.
_SYS = {
    "x86_64": {
        "pivot_root": 155,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "capset": 126,
    },
    "aarch64": {
        "pivot_root": 41,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "capset": 91,
    },
}

INNER_UID = INNER_GID = 1000  # the sandbox's uid and gid inside its user namespace: not root
FEATURES = ("user_namespace", "mount_namespace", "pid_namespace", "network_namespace", "seccomp", "landlock")


class IsolationUnavailable(OSError):
    """A kernel feature the sandbox needs is missing; ``feature`` is one of ``FEATURES``."""

    def __init__(self, feature: str, detail: str):
        super().__init__(f"{feature}: {detail}")
        self.feature = feature


_libc = ctypes.CDLL(None, use_errno=True)
_SIMULATED_MISSING: set[str] = set()  # tests: features to report as missing (see ``simulate_missing``)


def simulate_missing(features: list[str]) -> None:
    """Treat ``features`` as unavailable in this process (tests of the refusal path; inherited by forks)."""
    _SIMULATED_MISSING.clear()
    _SIMULATED_MISSING.update(features)


def _check(feature: str, what: str, rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise IsolationUnavailable(feature, f"{what} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _simulated(feature: str) -> None:
    if feature in _SIMULATED_MISSING:
        raise IsolationUnavailable(feature, "simulated as missing (test)")


def _syscall(name: str, *args) -> int:
    machine = os.uname().machine
    if machine not in _SYS:
        raise IsolationUnavailable("seccomp", f"unsupported machine {machine!r} (x86_64, aarch64)")
    return _libc.syscall(_SYS[machine][name], *args)


def _unshare(flags: int, feature: str) -> None:
    _simulated(feature)
    _check(feature, f"unshare({flags:#x})", _libc.unshare(ctypes.c_int(flags)))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None, feature: str) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(
        feature, f"mount({source!r} on {target!r})", _libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])
    )


def _write(path: str, text: str, feature: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise IsolationUnavailable(feature, f"writing {text!r} to {path} failed: {exc}") from exc


# ----- once, in the warm worker ------------------------------------------------------------------------


def visible_paths() -> list[str]:
    """Host directories the sandbox sees (read-only): the system's and the interpreter's, nothing else."""
    wanted = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"]
    wanted += [sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    wanted += [p for p in sys.path if p]
    out: list[str] = []
    for p in wanted:
        for q in {os.path.abspath(p), os.path.realpath(p)}:  # a venv's lib64 -> lib link: both names
            if os.path.exists(q) and q not in out:
                out.append(q)
    return out


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def bound_paths(visible: list[str], hidden: tuple[str, ...]) -> list[str]:
    """The ``visible`` paths to bind: none under a ``hidden`` one, except inside an interpreter prefix.

    A virtual environment inside the hidden checkout (``make setup``'s ``.venv``) is the interpreter's own
    prefix: its site-packages must be there, or only modules imported before the fork work and a lazy
    submodule (``sympy.solve`` importing ``sympy.tensor``) fails in every step. The checkout itself stays
    hidden: a prefix that holds a hidden path (a venv made at the checkout's root) does not unhide it.
    """
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    prefixes |= {os.path.abspath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    allowed = [pre for pre in prefixes if not any(_under(h, pre) for h in hidden)]
    return [p for p in visible if not any(_under(p, h) for h in hidden) or any(_under(p, a) for a in allowed)]


def enter_zygote(base_dir: str, outer_uid: int, outer_gid: int, hidden: tuple[str, ...] = ()) -> None:
    """User, network and mount namespaces for the warm worker, and a read-only root made of ``visible_paths``.

    ``base_dir``: a host directory of the pool's, for the new root's mount point. ``hidden``: paths never
    bound even when the interpreter's sys.path names them (the project checkout, which holds runs and configs).
    """
    euid, egid = os.geteuid(), os.getegid()
    if euid == 0:
        os.setgroups([])  # no supplementary groups (root's group 0) inside
    hidden = (*hidden, "/tmp", "/proc", "/dev")  # these three are the sandbox's own
    binds = bound_paths(visible_paths(), hidden)
    if euid == 0:
        _enter_user_namespace_as_root(outer_uid, outer_gid)
    else:  # an ordinary user may map exactly its own uid and gid, and needs no helper
        _unshare(CLONE_NEWUSER, "user_namespace")
        _write("/proc/self/setgroups", "deny", "user_namespace")
        _write("/proc/self/uid_map", f"{INNER_UID} {euid} 1", "user_namespace")
        _write("/proc/self/gid_map", f"{INNER_GID} {egid} 1", "user_namespace")
    _unshare(CLONE_NEWNS, "mount_namespace")
    _unshare(CLONE_NEWNET, "network_namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "mount_namespace")
    root = os.path.join(base_dir, "root")
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m", "mount_namespace")
    for path in binds:
        _bind_into(root, path)
    for node in ("null", "zero", "full", "random", "urandom"):
        _bind_into(root, f"/dev/{node}")
    for f in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(f):
            _bind_into(root, f)
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    # The host's /proc, only so the kernel lets each cell mount its own procfs over it (a new procfs needs
    # a fully visible one already in the mount namespace). Every step process sees the cell's instead.
    _mount("/proc", os.path.join(root, "proc"), None, MS_BIND | MS_REC, None, "mount_namespace")
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    os.makedirs(os.path.join(root, ".old"))
    _check("mount_namespace", "pivot_root", _syscall("pivot_root", root.encode(), os.path.join(root, ".old").encode()))
    os.chdir("/")
    _check("mount_namespace", "umount2(/.old)", _libc.umount2(b"/.old", MNT_DETACH))
    os.rmdir("/.old")
    # struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}: read-only and nosuid, recursively.
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    _check(
        "mount_namespace",
        "mount_setattr(/, read-only, recursive)",
        _syscall("mount_setattr", AT_FDCWD, b"/", AT_RECURSIVE, buf, ctypes.c_size_t(len(attr))),
    )


def _enter_user_namespace_as_root(outer_uid: int, outer_gid: int) -> None:
    """Map the inner uid to ``outer_uid`` (not root), and 0 to 0 for the warm worker itself, which must own
    the files of the new root it builds (an unmapped owner cannot create inodes). Step processes switch to
    the inner uid and lose every capability, so the 0 line gives them nothing. Once in the namespace this
    process has no capability in the parent one, so a helper forked before the unshare, still root outside,
    writes the maps."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        status = 1
        try:
            os.close(go_w)
            os.close(done_r)
            if os.read(go_r, 1) == b"u":
                for name, text in (
                    ("setgroups", "deny"),
                    ("uid_map", f"0 0 1\n{INNER_UID} {outer_uid} 1"),
                    ("gid_map", f"0 0 1\n{INNER_GID} {outer_gid} 1"),
                ):
                    with open(f"/proc/{me}/{name}", "w") as f:
                        f.write(text)
                status = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe, read below
            os.write(done_w, f"{type(exc).__name__}: {exc}".encode()[:500])
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(done_w)
    error = ""
    try:
        _unshare(CLONE_NEWUSER, "user_namespace")
        os.write(go_w, b"u")
    finally:
        os.close(go_w)  # without the go byte, the helper exits without writing anything
        with os.fdopen(done_r, "rb") as f:
            error = f.read().decode(errors="replace")
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise IsolationUnavailable("user_namespace", f"writing the uid/gid maps failed: {error or status}")


def _bind_into(root: str, path: str) -> None:
    target = root + path
    if _is_toplevel_link(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)  # /lib -> usr/lib on merged-/usr systems
        return
    if os.path.lexists(target) and os.path.ismount(target):
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(path, target, None, MS_BIND | MS_REC, None, "mount_namespace")


def _is_toplevel_link(path: str) -> bool:
    return os.path.dirname(path.rstrip("/")) == "/" and os.path.islink(path)


# ----- per cell -----------------------------------------------------------------------------------------


def enter_cell(scratch_mb: int) -> None:
    """In the warm worker's fork that makes a cell: new PID and mount namespaces, a private tmpfs on /tmp.

    The PID namespace applies to this process's next child, which becomes the cell's init.
    """
    _unshare(CLONE_NEWPID, "pid_namespace")
    _unshare(CLONE_NEWNS, "mount_namespace")
    uid = f"uid={INNER_UID},gid={INNER_GID}"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,{uid},size={scratch_mb}m", "mount_namespace")


def mount_cell_proc() -> None:
    """In the cell's init (pid 1 of the new namespace): a /proc that shows only the cell's processes."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None, "pid_namespace")


# ----- what the kernel offers ---------------------------------------------------------------------------


def probe() -> list[str]:
    """Names of ``FEATURES`` this kernel does not offer to this process, tried in a throwaway child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a throwaway child: namespaces entered here vanish with it
        os.close(r)
        missing = []
        for feature, flags in (
            ("user_namespace", CLONE_NEWUSER),
            ("mount_namespace", CLONE_NEWNS),
            ("network_namespace", CLONE_NEWNET),
            ("pid_namespace", CLONE_NEWPID),
        ):
            try:
                _unshare(flags, feature)
            except IsolationUnavailable:
                missing.append(feature)
                if feature == "user_namespace":
                    missing += ["mount_namespace", "network_namespace", "pid_namespace"]
                    break
        from pipeline.sandbox import confine  # it imports this module

        try:
            confine.load_libseccomp()
        except IsolationUnavailable:
            missing.append("seccomp")
        if confine.landlock_abi() < 1:
            missing.append("landlock")
        os.write(w, ",".join(missing).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    return [m for m in data.split(",") if m]
