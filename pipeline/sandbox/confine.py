"""Confinement of a cell's first step process, inherited by every state and step below it, irrevocable.

setuid to the inner uid, every capability dropped, no_new_privs, hard rlimits (soft = hard), Landlock
(read-only everywhere but /tmp, no TCP, no abstract unix sockets or signals outside the cell) and a seccomp
filter (libseccomp through ctypes) that denies what a math step never needs. See ``isolation`` for the
namespaces around it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import struct

from pipeline.sandbox.isolation import (
    _NS_FLAGS,
    _SIMULATED_MISSING,
    INNER_GID,
    INNER_UID,
    IsolationUnavailable,
    _check,
    _libc,
    _syscall,
)

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


# What the kernel must refuse to a step. EPERM, so Python raises PermissionError with the syscall's name
# in the traceback; the in-process guard usually refuses first with a clearer message.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "pidfd_send_signal",
    "kill",
    "tkill",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "mount_setattr",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "unshare",
    "setns",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "name_to_handle_at",
    "execve",
    "execveat",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "vhangup",
    "uselib",
    "migrate_pages",
    "move_pages",
    "mbind",
    "lookup_dcookie",
    "personality",
)


def confine(memory_mb: int, file_size_mb: int, nproc: int, nofile: int = 256) -> None:
    """Irrevocable limits for this process and all it forks; call before any model code runs."""
    os.setresgid(INNER_GID, INNER_GID, INNER_GID)
    os.setresuid(INNER_UID, INNER_UID, INNER_UID)
    mb = 1 << 20
    for res, value in (
        (resource.RLIMIT_AS, memory_mb * mb),
        (resource.RLIMIT_FSIZE, file_size_mb * mb),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_NOFILE, nofile),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ):
        resource.setrlimit(res, (value, value))  # soft = hard: the step cannot raise them back
    _drop_capabilities()
    _check("seccomp", "prctl(PR_SET_NO_NEW_PRIVS)", _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    _landlock()
    _seccomp()


def _drop_capabilities() -> None:
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # two __user_cap_data_struct {effective, permitted, inheritable}: all zero
    _check("user_namespace", "capset(none)", _syscall("capset", header, data))


# Landlock (include/uapi/linux/landlock.h). Access rights up to ABI 5; scopes from ABI 6.
_LL_FS = {
    "EXECUTE": 1 << 0,
    "WRITE_FILE": 1 << 1,
    "READ_FILE": 1 << 2,
    "READ_DIR": 1 << 3,
    "REMOVE_DIR": 1 << 4,
    "REMOVE_FILE": 1 << 5,
    "MAKE_CHAR": 1 << 6,
    "MAKE_DIR": 1 << 7,
    "MAKE_REG": 1 << 8,
    "MAKE_SOCK": 1 << 9,
    "MAKE_FIFO": 1 << 10,
    "MAKE_BLOCK": 1 << 11,
    "MAKE_SYM": 1 << 12,
    "REFER": 1 << 13,
    "TRUNCATE": 1 << 14,
    "IOCTL_DEV": 1 << 15,
}
_LL_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}  # ABI >= 5: all 16
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1, 2
_LL_RULE_PATH_BENEATH = 1


def landlock_abi() -> int:
    if "landlock" in _SIMULATED_MISSING:
        return 0
    abi = _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


def _landlock() -> None:
    abi = landlock_abi()
    if abi < 1:
        raise IsolationUnavailable("landlock", "landlock_create_ruleset(VERSION) failed: not in this kernel")
    fs_all = _LL_FS_BY_ABI.get(abi, (1 << 16) - 1)
    net = (_LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL) if abi >= 6 else 0
    attr = struct.pack("QQQ", fs_all, net, scoped)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _syscall("landlock_create_ruleset", attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        _check("landlock", "landlock_create_ruleset", -1)
    try:
        read = _LL_FS["EXECUTE"] | _LL_FS["READ_FILE"] | _LL_FS["READ_DIR"]
        dev_rw = read | _LL_FS["WRITE_FILE"] | (_LL_FS["TRUNCATE"] if abi >= 3 else 0)
        for path, access in (("/", read), ("/tmp", fs_all), ("/dev/null", dev_rw & ~_LL_FS["READ_DIR"])):
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", access & fs_all, pfd)  # struct landlock_path_beneath_attr, packed
                _check(
                    "landlock",
                    f"landlock_add_rule({path})",
                    0 if _syscall("landlock_add_rule", fd, _LL_RULE_PATH_BENEATH, rule, 0) == 0 else -1,
                )
            finally:
                os.close(pfd)
        _check("landlock", "landlock_restrict_self", _syscall("landlock_restrict_self", fd, 0))
    finally:
        os.close(fd)


# libseccomp through ctypes (the Debian/Ubuntu package libseccomp2; no Python binding needed).
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE, _SCMP_CMP_MASKED_EQ = 1, 7
_AF_UNIX = 1


def _scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libseccomp() -> ctypes.CDLL:
    if "seccomp" in _SIMULATED_MISSING:
        raise IsolationUnavailable("seccomp", "simulated as missing (test)")
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise IsolationUnavailable("seccomp", f"libseccomp not found ({exc}); install the libseccomp2 package") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


_LIBSECCOMP: ctypes.CDLL | None = None


def load_libseccomp() -> None:
    """Load libseccomp now (in the warm worker, while the host's library paths are still visible)."""
    global _LIBSECCOMP
    _LIBSECCOMP = _libseccomp()


_BPF: bytes = b""  # the compiled filter (struct sock_filter[]), made once in the warm worker


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def compile_filter() -> None:
    """Build the seccomp filter with libseccomp and keep its BPF program, so each cell only loads it
    (libseccomp takes milliseconds to generate it; loading takes microseconds)."""
    global _BPF
    lib = _LIBSECCOMP or _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise IsolationUnavailable("seccomp", "seccomp_init failed")
    try:
        eperm = _scmp_act_errno(errno.EPERM)

        def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not a syscall on this architecture
            arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr if cmps else None)
            if rc != 0:
                raise IsolationUnavailable("seccomp", f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")

        for name in DENIED_SYSCALLS:
            rule(eperm, name)
        rule(eperm, "socket", (0, _SCMP_CMP_NE, _AF_UNIX, 0))  # only AF_UNIX sockets
        for flag in _NS_FLAGS:  # fork yes (states fork their children), new namespaces no
            rule(eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        # clone3 passes its flags in memory, which a filter cannot read: ENOSYS, and glibc falls back to clone.
        rule(_scmp_act_errno(errno.ENOSYS), "clone3")
        r, w = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, w)
            os.close(w)
            w = -1
            if rc != 0:
                raise IsolationUnavailable("seccomp", f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            _BPF = b"".join(chunks)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        lib.seccomp_release(ctx)
    if not _BPF or len(_BPF) % 8:
        raise IsolationUnavailable("seccomp", f"seccomp_export_bpf gave {len(_BPF)} bytes, not a filter")


def _seccomp() -> None:
    if not _BPF:
        compile_filter()
    buf = ctypes.create_string_buffer(_BPF, len(_BPF))
    prog = _SockFprog(len(_BPF) // 8, ctypes.addressof(buf))  # 8 bytes per struct sock_filter
    # prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog); no_new_privs is already set.
    _check("seccomp", "prctl(PR_SET_SECCOMP)", _libc.prctl(22, 2, ctypes.byref(prog), 0, 0))


def require_all() -> None:
    """Raise ``IsolationUnavailable`` now, in the warm worker, if seccomp or Landlock is missing: every cell
    needs both, and a pool that starts must not fail per step later."""
    if _LIBSECCOMP is None:
        load_libseccomp()
    compile_filter()
    if landlock_abi() < 1:
        raise IsolationUnavailable("landlock", "landlock_create_ruleset(VERSION) failed: not in this kernel")
