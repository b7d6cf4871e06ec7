"""A cap on glibc's malloc arenas for processes that generate on several threads.

The transformers engine allocates KV tensors of every size on its batch thread and on the threads of its
callers. glibc gives each thread an arena of its own (up to 8 per core) and returns little of their freed
memory to the system, so an engine process grows far past what it holds: round 4's evaluation of the
embedded run peaked at 8.8 GiB of RSS with glibc's default, 4.9 GiB with ``MALLOC_ARENA_MAX=2`` in the
environment and 4.7 GiB with this function called first thing in the command (README, "The embedded run").
``limit_arenas`` sets the cap from inside the process with ``mallopt`` (``M_ARENA_MAX``), which only applies
to arenas created afterwards: called when the engine was built (after Ray's and torch's threads had started)
it changed nothing (9.5 GiB). So the entry points (round.py, pipeline.resume, python -m pipeline) call it
before anything else, through ``pipeline.engines.process.prepare_process``; the engine calls that again for
processes that did not start from one of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's malloc.h
DEFAULT_ARENAS = 2


def limit_arenas(n: int = DEFAULT_ARENAS) -> bool:
    """Cap this process's malloc arenas at ``n`` and export ``MALLOC_ARENA_MAX`` so that processes started
    from it (a local Ray cluster's workers) start with the same cap. True when the cap was set here; False
    when ``MALLOC_ARENA_MAX`` is already in the environment (glibc applied it at start: the user's choice
    stands) or the C library is not glibc (nothing to do)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if mallopt(M_ARENA_MAX, n) != 1:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(n)
    return True
