"""What the pool's reactor tracks: a step being executed, a kept live state, and the warm zygote.

Plain records with identity semantics (``eq=False``): jobs live in sets and key the selector, so two jobs
with equal fields are still two jobs.
"""

from __future__ import annotations

import math
import socket
import subprocess
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.sandbox.result import ExecResult


@dataclass(eq=False)  # identity: jobs live in a set and key the selector
class Job:
    future: Future
    key: tuple[str, str] | None  # (tree_id, node_key); None for a one-shot execution
    parent: tuple[str, str] | None
    code: str
    history: tuple[str, ...]
    timeout: float
    keep: bool
    pid: int = 0  # host pid, from the kernel's credentials on the child's first record; 0 until then
    sock: socket.socket | None = None
    codes: int = 1  # steps this execution runs (1 + replayed)
    replayed: int = 0
    start: float = 0.0
    deadline: float = math.inf
    marked_running: bool = False  # Future.set_running_or_notify_cancel() may be called once only
    seq: int = 0  # of the fork request that started it
    forker: Any = None  # the State or Zygote asked to fork it
    replied: bool = False  # the forker answered the request
    cell: int | None = None  # host pid of the cell's init (kernel isolation)
    result: ExecResult | None = None  # arrived before the forker's reply: held until it comes
    violation: str = ""  # why its process may not be kept


@dataclass(eq=False)
class State:
    pid: int
    sock: socket.socket
    tree_id: str
    key: tuple[str, str]
    cell: int | None
    asked: set[int] = field(default_factory=set)  # sequence numbers sent and not yet answered


@dataclass(eq=False)
class Zygote:
    proc: subprocess.Popen
    sock: socket.socket
    started: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
