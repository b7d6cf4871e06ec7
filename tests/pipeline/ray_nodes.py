"""Two Ray nodes on 127.0.0.1 for the multi-node tests: a head and a second node, each a ``ray start --block``
process in its own session with its own ports and temp dir (the session-wide Ray cluster of tests/conftest.py
holds the default agent ports)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from test_ray_job import BIN, _free_port, _stop_node

from pipeline.cluster import REPO_ROOT


def ray_node(args: Sequence[str], temp_dir: str, env: dict[str, str], hide: Path | None = None) -> subprocess.Popen:
    """A ``ray start --block`` node; ``hide``: a directory that its processes see as an empty tmpfs."""
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # Ports of its own (the session's Ray cluster and the other node may hold the defaults).
           f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}", *args]
    if hide is not None:  # unshare execs: the node's pid (and process group) stay the Popen's
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=1m none "$0" && exec "$@"', str(hide), *cmd]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@contextlib.contextmanager
def two_node_cluster(head_args: Sequence[str] = (), second_args: Sequence[str] = (),
                     second_env: dict[str, str] | None = None,
                     hide: Path | None = None) -> Iterator[tuple[str, subprocess.Popen, dict[str, str]]]:
    """(head gcs address, the second node's process, the nodes' env); both nodes stopped on exit.
    ``second_env`` is added to the second node's env; ``hide`` is hidden from it (``ray_node``)."""
    temp = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for tries_left in range(2, -1, -1):
        # A free port can be taken by another process (another Ray cluster on the machine) before the head binds
        # it: the head then exits at once, and starts again on new ports.
        gcs, dash = _free_port(), _free_port()
        head = ray_node(["--head", *head_args, f"--port={gcs}", f"--dashboard-port={dash}",
                         "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                         f"--ray-client-server-port={_free_port()}"], f"{temp}/h", env)
        try:
            wait_for(lambda d=dash: urllib.request.urlopen(f"http://127.0.0.1:{d}/api/version", timeout=2), head,
                     "head")
            break
        except RuntimeError:
            exited = head.poll() is not None  # else it ran and never answered: not a port race
            _stop_node(head, f"{temp}/h")
            if not tries_left or not exited:
                raise
    second = None
    try:
        second = ray_node([f"--address=127.0.0.1:{gcs}", *second_args], f"{temp}/n", {**env, **(second_env or {})},
                          hide=hide)
        wait_for(lambda: nodes_alive(dash) == 2 or (_ for _ in ()).throw(OSError("1 node")), second, "second node")
        yield f"127.0.0.1:{gcs}", second, env
    finally:
        if second is not None:
            _stop_node(second, f"{temp}/n")
        _stop_node(head, f"{temp}/h")


def nodes_alive(dash: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{dash}/nodes?view=summary", timeout=2) as r:
        nodes = json.load(r)["data"]["summary"]
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")


def wait_for(probe, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except (OSError, KeyError, ValueError):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"ray {what} did not come up (exit code {proc.poll()})") from None
            time.sleep(0.5)
