"""One thread for a process's model compute: every forward of the transformers engines runs on it.

torch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels). Every thread that runs a parallel kernel
becomes the master of a team of its own, whose workers live as long as that thread does, and libgomp counts
them all: once a process holds more such threads than it has CPUs, it cuts the time a thread spins at a
barrier from ~3 ms to ~100 spins (``gomp_throttled_spin_count_var``), so each of the hundreds of barriers of a
decode step sleeps on a futex and wakes again. Measured on the embedded model (bf16, 64 rows over 300 tokens,
2 cores, 2026-12-02): one decode step took 87 ms on the only thread that had computed, and 143-155 ms on a
second thread after the first had computed (11,500 voluntary context switches against 6); the same 88 ms
when the first thread had only loaded the model. ``OMP_WAIT_POLICY=passive`` makes the first thread as slow
(154 ms) too. The engine used to compute on the caller's thread (the shared prefix's forward, the fast-path
probe) and on a batch thread of its own: always the slow case.

So the engines hand their compute to one long-lived thread per process (``run`` waits for a result,
``submit`` does not), which serves them in the order they came. Keeping to one thread also keeps the tensors in
one malloc arena (``pipeline.engines.malloc``). A caller that already is the compute thread runs its function in
place.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
THREAD_NAME = "torch-compute"

_lock = threading.Lock()
_thread: threading.Thread | None = None
_jobs: queue.SimpleQueue | None = None


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, args, kwargs, future = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # the caller re-raises it
            future.set_exception(e)


def _queue() -> queue.SimpleQueue:
    global _thread, _jobs
    with _lock:
        if _thread is None:
            _jobs = queue.SimpleQueue()
            # A daemon: an engine left open must not hold the interpreter at exit (``close`` runs at exit anyway).
            _thread = threading.Thread(target=_serve, args=(_jobs,), name=THREAD_NAME, daemon=True)
            _thread.start()
        return _jobs


def is_compute_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(fn: Callable[..., T], *args, **kwargs) -> Future:
    """Queues ``fn(*args, **kwargs)`` for the compute thread; returns its future."""
    future: Future = Future()
    _queue().put((fn, args, kwargs, future))
    return future


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute thread (in place when called from it); its result or its exception."""
    if is_compute_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


def close(timeout: float = 10.0) -> None:
    """Stops the compute thread once the work queued before this is done; the next ``submit`` starts a new one (whose
    OpenMP team replaces the old one's: the old thread is gone). Runs at interpreter exit."""
    global _thread, _jobs
    with _lock:
        thread, jobs = _thread, _jobs
        _thread = _jobs = None
    if thread is not None and jobs is not None:
        jobs.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout)


atexit.register(close)
