"""Session-wide guard: the test process must end with nothing of ours still running.

Whatever a test starts (a Ray session, a sandbox pool, a grading pool, a server thread) its fixture must stop.
Leftovers are how an interpreter that passed every test still crashes at exit (issue 19: a segfault after
"564 passed" made `make test` exit 2), so the last teardown of the session fails, naming each one, when it
finds a non-daemon thread, a thread of one of our pools, a child process, or an initialised Ray session.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import pytest

from pipeline.engines.gemm import fix_gemm_order

fix_gemm_order()  # as round.py does first: tests check that batching leaves each request's tokens alone

# Threads the project starts are daemons, so "non-daemon" alone would miss a leaked pool: name them too.
_OUR_THREAD_PREFIXES = ("sandbox-pool", "grading-pool", "vllm-async-loop", "torch-compute")
_SETTLE_S = 10.0  # shutdowns finish asynchronously (a killed child is reaped, a thread sees its stop flag)


def leftovers() -> list[str]:
    """What is still running in this process that a test started, one line each (empty: nothing)."""
    found = []
    for t in threading.enumerate():
        if t is threading.main_thread() or not t.is_alive():
            continue
        if not t.daemon or t.name.startswith(_OUR_THREAD_PREFIXES):
            found.append(f"thread {t.name!r} (daemon={t.daemon}, ident={t.ident})")
    try:
        import psutil
    except ImportError:  # psutil is in the [dev] extra; without it, children are not checked
        psutil = None
    if psutil is not None:
        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue  # exited; nothing runs (its parent is gone or reaps it later)
                cmd = " ".join(" ".join(child.cmdline()).split())
                if "multiprocessing.resource_tracker" in cmd:
                    continue  # Python's own helper, started by multiprocessing's first use (vLLM), ends with us
                found.append(f"child process {child.pid}: {cmd[:200]}")
            except psutil.NoSuchProcess:
                pass
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        found.append("a Ray session (ray.is_initialized() is True: call ray.shutdown() in the fixture that started it)")
    return found


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every in-process Ray test, started on first use and shut down at session end.

    Ray is not meant to be initialised and shut down repeatedly in one process: ``ray.shutdown()`` leaves the
    core worker's native threads (gcs_client_io_service, gRPC's event engine and timers) behind, and background
    threads that touched the first session can reach freed core-worker state (ray-project/ray#31145). One
    session per test process, stopped by this fixture before the interpreter exits, is the supported shape.
    """
    ray = pytest.importorskip("ray")
    from pipeline.cluster import connect, disconnect
    from pipeline.config import RayConfig

    if ray.is_initialized():  # not ours: a test that leaked one (the guard below names it too)
        ray.shutdown()
    cluster = connect(RayConfig(num_cpus=2))
    assert cluster.started, cluster
    yield cluster
    disconnect(cluster)


@contextlib.contextmanager
def _local_server(argv_for_port, what: str):
    """Start ``argv_for_port(port)`` on 127.0.0.1 and a free port, in its own process; yield the port once it
    accepts connections; stop it on exit."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{what} on 127.0.0.1:{port} did not start (exit status {proc.poll()}); is the "
                                f"[dev] extra installed (pip install -e '.[dev]')?")
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server for the session: moto in server mode (the [dev] extra) on 127.0.0.1 and a free
    port, in its own process. Yields the standard AWS_* variables that point a client at it."""
    with _local_server(lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)],
                       "moto S3 server") as port:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS-protocol (JSON API) server for the session: gcp-storage-emulator (the [dev] extra), in memory, on
    127.0.0.1 and a free port. Yields STORAGE_EMULATOR_HOST, the variable Google's clients read for one."""
    with _local_server(lambda p: [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                  "--port", str(p), "--in-memory"], "gcp-storage-emulator") as port:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request):
    """A fresh bucket on the session's GCS emulator, with STORAGE_EMULATOR_HOST set: yields ``gs://<bucket>``."""
    import re
    import uuid

    from pyarrow import fs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server["STORAGE_EMULATOR_HOST"])
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs.GcsFileSystem(anonymous=True, scheme="http", project_id="test",
                     endpoint_override=gcs_server["STORAGE_EMULATOR_HOST"].removeprefix("http://")).create_dir(name)
    return f"gs://{name}"


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the session's S3 server, with AWS_* set for this test: yields ``s3://<bucket>``."""
    import re
    import uuid

    from pyarrow import fs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"].removeprefix("http://"), scheme="http",
                    region="us-east-1", allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """Set up first and torn down last in the session, after every other fixture has stopped what it started."""
    yield
    from pipeline.engines import compute
    from pipeline.sandbox import oneshot

    oneshot.close()  # the process-wide pool of ``run_code`` (closed at exit otherwise); tests may use it freely
    compute.close()  # the process-wide compute thread of the engines, likewise
    deadline = time.monotonic() + _SETTLE_S
    found = leftovers()
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = leftovers()
    if found:
        pytest.fail("the test session left these running (stop them in the fixture that started them):\n  "
                    + "\n  ".join(found), pytrace=False)
