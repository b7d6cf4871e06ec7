"""The session-end guard of tests/conftest.py: it names what a test leaves running, and nothing once it stops."""

from __future__ import annotations

import subprocess
import sys
import threading

from tests.conftest import leftovers


def test_guard_names_a_leaked_thread_and_child_then_nothing_once_stopped():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="leaky-worker")  # non-daemon, as a forgotten worker would be
    t.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = leftovers()
        assert any("thread 'leaky-worker' (daemon=False" in line for line in found), found
        assert any(line.startswith(f"child process {child.pid}:") for line in found), found
    finally:
        stop.set()
        t.join()
        child.kill()
        child.wait()
    # Stopped and reaped: no longer reported (other lines may come and go: a session-wide Ray cluster's workers).
    assert not [line for line in leftovers() if "leaky-worker" in line or f"process {child.pid}:" in line]


def test_guard_names_a_leaked_sandbox_pool_thread_even_though_it_is_a_daemon():
    from pipeline.sandbox import SandboxConfig, SandboxPool

    pool = SandboxPool(SandboxConfig(workers=1, max_live_states=0))
    try:
        found = leftovers()
        # By ident: an earlier test in this process may hold another pool (run_code's), which is not this test's.
        mine = f"thread 'sandbox-pool' (daemon=True, ident={pool._thread.ident})"
        assert mine in found, found
        zygote = pool.processes()["zygote"]
        assert any(line.startswith(f"child process {zygote}:") for line in found), found  # its zygote
    finally:
        pool.close()
    assert not [line for line in leftovers() if line == mine or f"process {zygote}:" in line]
