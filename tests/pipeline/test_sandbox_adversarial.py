"""Adversarial inputs (issues 4 and 14), each against one real pool with kernel isolation: an error
result within the timeout plus a small margin, the pool still serving afterwards, and no process left
behind.

All cases are submitted at once (two run at a time) so the file takes seconds, not a minute; each
result's ``duration`` is still its own dispatch-to-result time. The whole file runs twice: as the user
pytest runs as (root in CI and here), and again, from ``test_suite_as_an_unprivileged_user``, inside a
user namespace as uid 1000 with no capabilities on the host.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from pipeline.sandbox import SandboxConfig, SandboxPool

TIMEOUT = 1.0
# The deadline is timeout + 0.5 s for fork and transfer; the rest is slack for two cores shared with
# other work, so a pass means "bounded by the timeout", not a benchmark.
MARGIN = 3.0
SECRET = f"hunter2-{uuid.uuid4().hex}"
ESCAPE = f"/tmp/open-rstar-escape-{uuid.uuid4().hex}.txt"
AS = os.environ.get("OPENRSTAR_SANDBOX_AS", "invoking user")  # "uid 1000 in a user namespace" in the re-run
# Issue 14: one line reaches the in-process guard and switches it off, and the per-step soft rlimits (no
# fork, no thread) are raised back to their hard values. Every case that starts with it tests the kernel.
UNGUARD = (
    "import sys, resource as _r\nsys.modules['pipeline.sandbox.limits'].GUARD.armed = False\n"
    "_r.setrlimit(_r.RLIMIT_NPROC, (_r.getrlimit(_r.RLIMIT_NPROC)[1],) * 2)\n"
)
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# name -> (code, allowed error kinds). ``{pool_pid}`` is filled in with the test process's pid.
CASES = {
    "busy_loop": ("while True:\n    pass", {"timeout"}),
    "sleep_forever": ("import time\ntime.sleep(3600)", {"timeout"}),
    "list_bomb": ("x = [0] * 10**10", {"memory"}),
    "string_bomb": ("x = 'a' * 10**11", {"memory"}),
    "fork_loop": ("import os\nwhile True:\n    os.fork()", {"forbidden"}),
    "fork_loop_swallowing_errors": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
        {"timeout"},
    ),
    "multiprocessing_fork": (
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()",
        {"forbidden"},
    ),
    "multiprocessing_spawn": (
        "import multiprocessing as mp\np = mp.get_context('spawn').Process(target=print)\np.start()\np.join()",
        {"forbidden"},
    ),
    "subprocess": ("import subprocess\nsubprocess.run(['sleep', '60'])", {"forbidden"}),
    "os_system": ("import os\nos.system('sleep 60')", {"forbidden"}),
    "thread": (
        "import threading\nthreading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()",
        {"forbidden"},
    ),
    "write_outside_scratch": ("open('/usr/lib/open-rstar-escape.txt', 'w').write('pwned')", {"forbidden"}),
    "write_via_parent_dir": ("open('../../escape.txt', 'w').write('pwned')", {"forbidden"}),
    "remove_outside_scratch": ("import os\nos.remove('/etc/hostname')", {"forbidden"}),
    "read_pool_environment": ("print(open('/proc/{pool_pid}/environ').read())", {"forbidden"}),
    "sys_exit": ("import sys\nsys.exit()", {"exit"}),
    "os_exit": ("import os\nos._exit(3)", {"killed"}),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", {"forbidden"}),
    "kill_group": ("import os\nos.killpg(0, 9)", {"forbidden"}),
    "recursion_bomb": ("def f(n):\n    return f(n + 1)\nf(0)", {"runtime"}),
    "recursion_limit_abuse": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)",
        {"timeout", "killed", "memory", "runtime"},
    ),
    "print_100mb": ("print('x' * 100_000_000)", {"output"}),
    "print_forever": ("while True:\n    print('spam')", {"output"}),
    "signal_tampering": (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGALRM):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
        {"timeout"},
    ),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)", {"killed"}),
    "ctypes_libc": ("import ctypes\nctypes.CDLL(None).fork()", {"forbidden"}),
    "huge_integer": ("x = 10**10**10", {"timeout", "memory"}),
    "socket_connect": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", {"forbidden"}),
    "socket_listen": ("import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()", {"forbidden"}),
    # ----- issue 14: with the guard switched off, the kernel still refuses -----
    "unguarded_write_anywhere": (UNGUARD + "open('/usr/lib/open-rstar-escape.txt', 'w').write('x')", {"runtime"}),
    "unguarded_tcp_to_pool": (
        UNGUARD + "import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)",
        {"runtime"},
    ),
    "unguarded_fork_outlives_step": (
        UNGUARD + "import os, time\nif os.fork() == 0:\n    time.sleep(60)",
        {"forbidden"},
    ),
    "unguarded_setsid_grandchild": (
        UNGUARD + "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(60)\n    os._exit(0)\nos.waitpid(pid, 0)",
        {"forbidden"},
    ),
    "unguarded_raise_cpu_limit": (
        UNGUARD + "import resource as r\nr.setrlimit(r.RLIMIT_CPU, (r.RLIM_INFINITY, r.RLIM_INFINITY))",
        {"runtime"},
    ),
    "unguarded_raise_nproc_soft": (
        UNGUARD + "import resource as r\ns, h = r.getrlimit(r.RLIMIT_NPROC)\nr.setrlimit(r.RLIMIT_NPROC, (h + 1, h))",
        {"runtime"},
    ),
    "write_through_dir_fd": (
        "import os\nfd = os.open('/usr/lib', os.O_RDONLY)\nos.open('escape.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        {"runtime"},
    ),
    "sqlite_on_any_path": (
        "import sqlite3\nsqlite3.connect('/usr/lib/escape.db').execute('create table t (a)')",
        {"runtime"},
    ),
    "pool_environ_via_task": ("print(open('/proc/{pool_pid}/task/{pool_pid}/environ').read())", {"runtime"}),
    "forged_result": (
        UNGUARD + "import json, socket\ns = socket.socket(fileno=3)\n"
        "s.send(json.dumps({'ok': False, 'kind': 'timeout', 'error': 'Timeout: forged', 'stdout': ''}).encode())\n"
        "s.detach()\nimport time\ntime.sleep(3600)",
        {"timeout"},
    ),
    # ----- more of our own -----
    "unguarded_mount": (
        UNGUARD
        + LIBC
        + "rc = libc.mount(b'none', b'/usr', b'tmpfs', 0, None)\nassert rc != 0\nraise OSError(ctypes.get_errno(), 'mount')",
        {"runtime"},
    ),
    "unguarded_unshare": (
        UNGUARD + LIBC + "assert libc.unshare(0x10000000) != 0\nraise OSError(ctypes.get_errno(), 'unshare')",
        {"runtime"},
    ),
    "unguarded_ptrace_init": (
        UNGUARD + LIBC + "assert libc.ptrace(16, 1, 0, 0) != 0\nraise OSError(ctypes.get_errno(), 'ptrace')",
        {"runtime"},
    ),
    "unguarded_kill_pool": (
        UNGUARD + LIBC + "assert libc.kill({pool_pid}, 9) != 0\nraise OSError(ctypes.get_errno(), 'kill')",
        {"runtime"},
    ),
    "unguarded_exec": (UNGUARD + "import os\nos.execv('/usr/bin/sleep', ['sleep', '60'])", {"runtime"}),
    "unguarded_thread_left_running": (
        UNGUARD + "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
        {"forbidden"},
    ),
    "read_host_secrets": ("print(open('/etc/shadow').read())", {"runtime"}),
    "read_project_checkout": (f"print(open({os.path.abspath(__file__)!r}).read())", {"runtime"}),
    "fill_scratch": ("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))", {"runtime"}),
    "unguarded_abstract_unix_to_other_cell": (
        UNGUARD + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0open-rstar-{pool_pid}')",
        {"runtime"},
    ),
}
UNPRIVILEGED_SKIP = {"fork_loop_swallowing_errors"}  # see test_suite_as_an_unprivileged_user


def _cases() -> dict:
    if AS == "invoking user":
        return CASES
    return {k: v for k, v in CASES.items() if k not in UNPRIVILEGED_SKIP}


@pytest.fixture(scope="module")
def outcome():
    os.environ["OPENRSTAR_TEST_SECRET"] = SECRET  # in the pool's environment, never in the sandbox's
    listener = socket.create_server(("127.0.0.1", 0))  # a TCP service on the pool's loopback
    listener.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX)  # an abstract unix socket in the pool's network namespace
    abstract.bind(f"\0open-rstar-{os.getpid()}")
    abstract.listen()
    abstract.setblocking(False)
    fill = {"{pool_pid}": str(os.getpid()), "{port}": str(listener.getsockname()[1])}
    try:
        # A 64 KiB output cap (1 MiB by default): print_forever reaches it in ~13k prints, well inside the 1 s
        # timeout even when the cores are shared (at 1 MiB it timed out first once, in a CI run beside `make run`).
        with SandboxPool(SandboxConfig(workers=2, timeout=TIMEOUT, scratch_mb=32,
                                       output_limit_bytes=64 << 10)) as pool:
            futures = {}
            for name, (code, _) in _cases().items():
                for k, v in fill.items():
                    code = code.replace(k, v)
                futures[name] = pool.submit_code(code)
            futures["environment"] = pool.submit_code(
                "import os\nprint(os.environ.get('OPENRSTAR_TEST_SECRET'), sorted(os.environ))"
            )
            futures["view"] = pool.submit_code(
                "import os\nprint(os.getuid(), sorted(p for p in os.listdir('/proc') if p.isdigit()),"
                " sorted(os.listdir('/')), open('/proc/net/dev').read().count(':'))"
            )
            futures["surrogate"] = pool.submit_code("print(chr(0xD800))")
            results = {name: f.result(timeout=120) for name, f in futures.items()}
            after = pool.run_code("print(6 * 7)")
            zygote = pool.processes()["zygote"]
            # The processes allowed besides: the spare cells' inits, made ahead for fresh steps (the warm
            # worker reports them just after it makes one, so ask until it has).
            deadline = time.monotonic() + 3.0
            while True:
                spare = pool.processes()["spare"]
                stray = [p for p in _live_descendants(zygote, wait=0.5) if int(p.split()[0]) not in spare]
                if not stray or time.monotonic() > deadline:
                    break
            connections = []
            for s in (listener, abstract):
                try:
                    connections.append(s.accept())
                except BlockingIOError:
                    pass  # nobody connected: what we want
            yield {
                "results": results,
                "after": after,
                "stray": stray,
                "zygote": zygote,
                "pool": pool,
                "stats": pool.stats(),
                "connections": connections,
            }
    finally:
        del os.environ["OPENRSTAR_TEST_SECRET"]
        listener.close()
        abstract.close()


def _live_descendants(pid: int, wait: float = 3.0) -> list[str]:
    """Non-zombie processes below ``pid``; a killed process may take a moment to die, so poll a little."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for p in psutil.Process(pid).children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.status()} {p.cmdline()[:2]}")
            except psutil.NoSuchProcess:
                continue  # exited while we looked
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adversarial_input_is_contained(outcome, name):
    if name not in outcome["results"]:
        pytest.skip(f"{name}: not run as {AS} (see UNPRIVILEGED_SKIP)")
    code, kinds = CASES[name]
    r = outcome["results"][name]
    assert not r.ok, f"{name}: expected an error, got ok with stdout {r.stdout[:200]!r}"
    assert r.error_kind in kinds, f"{name}: kind {r.error_kind!r} ({r.error}), expected one of {sorted(kinds)}"
    assert r.duration < TIMEOUT + MARGIN, f"{name}: took {r.duration:.2f}s with timeout {TIMEOUT}s"
    assert len(r.stdout) < 5000, f"{name}: stdout not capped ({len(r.stdout)} chars)"


def test_specific_messages(outcome):
    res = outcome["results"]
    assert res["busy_loop"].error == "Timeout: 1s"
    assert res["os_exit"].error == "Killed: exited with status 3 without a result"
    assert res["ctypes_segfault"].error == "Killed: signal 11 (SIGSEGV)"
    assert res["list_bomb"].error == "MemoryError"
    assert res["recursion_bomb"].error.startswith("RecursionError: maximum recursion depth exceeded")
    assert res["fork_loop"].error == "PermissionError: the sandbox does not allow os.fork"
    assert res["print_100mb"].stdout.endswith("chars]")  # the kept head, then the truncation marker


def test_kernel_refusals_name_the_cause(outcome):
    res = outcome["results"]
    assert res["unguarded_write_anywhere"].error.startswith("OSError: [Errno 30] Read-only file system")
    assert res["write_through_dir_fd"].error.startswith("OSError: [Errno 30] Read-only file system")
    assert res["unguarded_tcp_to_pool"].error.startswith("PermissionError: [Errno 1]")  # seccomp: AF_INET
    for name in ("unguarded_mount", "unguarded_unshare", "unguarded_ptrace_init", "unguarded_kill_pool"):
        assert res[name].error.startswith("PermissionError: [Errno 1]"), (name, res[name].error)  # seccomp: EPERM
    assert res["unguarded_exec"].error.startswith("PermissionError: [Errno 1]")
    assert res["unguarded_raise_cpu_limit"].error == "ValueError: not allowed to raise maximum limit"
    assert res["unguarded_raise_nproc_soft"].error.startswith("ValueError")  # soft = hard already
    assert "left 0 extra thread(s) and 1 process(es)" in res["unguarded_fork_outlives_step"].error
    assert "1 process(es)" in res["unguarded_setsid_grandchild"].error  # the orphan, found under the cell's init
    assert "left 1 extra thread(s)" in res["unguarded_thread_left_running"].error
    assert res["read_host_secrets"].error.startswith("FileNotFoundError")  # /etc is not in the sandbox's root
    assert res["read_project_checkout"].error.startswith("FileNotFoundError")
    assert res["pool_environ_via_task"].error.startswith("FileNotFoundError")  # the cell's /proc: no such pid
    assert res["fill_scratch"].error.startswith("OSError: [Errno 28] No space left on device")  # 32 MB tmpfs
    # Landlock scopes abstract unix sockets to the cell: ECONNREFUSED / EPERM, never a connection.
    assert res["unguarded_abstract_unix_to_other_cell"].error.startswith(("ConnectionRefusedError", "PermissionError"))
    assert (
        res["sqlite_on_any_path"].error.startswith("sqlite3.OperationalError")
        or "sqlite3" in res["sqlite_on_any_path"].error
        or res["sqlite_on_any_path"].error.startswith("OperationalError")
    ), res["sqlite_on_any_path"].error


def test_what_a_step_sees(outcome):
    res = outcome["results"]
    # uid 1000, only its cell's two processes (init and itself), the sandbox's root, and one interface (lo).
    uid, pids, *rest = res["view"].stdout.split(" ", 2)
    assert res["view"].ok, res["view"].error
    assert uid == "1000" and res["view"].stdout.startswith("1000 ['1', '2'] ")
    assert "'tmp'" in res["view"].stdout and "'etc'" in res["view"].stdout and "'home'" not in res["view"].stdout
    assert res["view"].stdout.rstrip().endswith(" 1")  # /proc/net/dev: one "name:" line, lo
    assert (res["surrogate"].ok, res["surrogate"].stdout) == (True, "\ufffd\n")


def test_forged_result_does_not_stall_the_pool(outcome):
    # The forger's own fake record is its own result; its real one arrives out of turn and costs it the
    # process. The pool thread never waited on it: every other step finished within its own bound.
    res = outcome["results"]
    assert res["forged_result"].error == "Timeout: forged"
    assert all(r.duration < TIMEOUT + MARGIN for r in res.values())
    assert not outcome["connections"], "a step reached a socket of the pool's"


def test_no_file_escapes_and_no_secret_leaks(outcome):
    assert not os.path.exists(ESCAPE)
    env = outcome["results"]["environment"]
    assert env.ok and env.stdout.startswith("None ")
    assert SECRET not in env.stdout and "OPENRSTAR_TEST_SECRET" not in env.stdout
    assert SECRET not in outcome["results"]["read_pool_environment"].stdout


def test_pool_keeps_serving_with_the_same_warm_worker_and_no_strays(outcome):
    after = outcome["after"]
    assert (after.ok, after.stdout) == (True, "42\n")
    assert outcome["stray"] == [], f"processes outlived their calls: {outcome['stray']}"
    assert outcome["pool"].stats().get("restarts", 0) == 0  # kill_parent did not take the zygote down


def test_suite_as_an_unprivileged_user():
    """The same file, re-run inside a user namespace as uid 1000 without host capabilities.

    fork_loop_swallowing_errors is left out there: the re-run's processes are still uid 0 on the host, and
    the kernel exempts uid 0 from RLIMIT_NPROC, so that one case would fork without bound for its second.
    """
    if AS != "invoking user":
        pytest.skip("already the unprivileged re-run")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux unshare to make the unprivileged user")
    env = {**os.environ, "OPENRSTAR_SANDBOX_AS": "uid 1000 in a user namespace"}
    cmd = [
        "unshare",
        "--user",
        "--map-user=1000",
        "--map-group=1000",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.abspath(__file__),
        "-k",
        "not unprivileged",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
