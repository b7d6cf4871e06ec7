"""The run lease: one driver per run directory at a time.

``round.py`` and ``python -m pipeline.resume`` take the lease (``RUN_DIR/_lease.json``) before touching the run
and give it back when they exit. A second driver on the same run is refused with a message naming the holder
(host, pid, since when, last heartbeat): without it both would execute every phase. The holder renews the lease
(a heartbeat) every ``timeout_s / 4`` seconds from a daemon thread.

A lease whose holder is gone is *stale*:
- its pid is dead on this very host (same hostname, boot and pid namespace; ``host_identity``): provably gone,
  so it is taken over without asking, as after a crash or a SIGKILL;
- its last heartbeat is older than ``timeout_s`` (a holder on another host, which cannot be probed): taken over
  only with ``--force``, because a holder that is merely slow or partitioned would otherwise run twice.

Acquiring is atomic on a filesystem (``LocalLeaseFile``): the lease is written complete under a temporary name and
hard-linked into place, which fails when a lease exists (POSIX, NFSv3+). On object storage the lease is an object
(``pipeline.storage.remote.ObjectLeaseFile``: write, wait, read back; its module doc says what that guarantees).
Taking over is a replace followed by a re-read that must find our token.
Clocks: staleness compares the holder's heartbeat time with ours, so hosts need clocks in sync to well within
``timeout_s`` (NTP gives milliseconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from data.atomic_io import StorageError, atomic_write_text, host_identity, pid_alive, proc_start, utc_now

LEASE_NAME = "_lease.json"
DEFAULT_TIMEOUT_S = 120.0  # a holder without a heartbeat for this long may be taken over with --force


@dataclass(frozen=True)
class Holder:
    host: str  # hostname, for people
    host_id: str  # host_identity() of the holder
    pid: int
    pid_start: str | None
    since: str  # ISO time the lease was taken
    since_ts: float  # the same, seconds since the epoch
    heartbeat_ts: float  # last renewal, seconds since the epoch
    token: str  # unique per acquisition

    def describe(self, now: float) -> str:
        return (f"host {self.host} pid {self.pid} since {self.since} (last heartbeat "
                f"{max(0.0, now - self.heartbeat_ts):.0f} s ago)")


class LeaseFile(Protocol):
    """Where the lease is kept: a file beside the run (``LocalLeaseFile``) or an object (``ObjectLeaseFile``)."""

    where: str  # for messages

    def read(self) -> str | None: ...  # None: no lease
    def create(self, text: str) -> bool: ...  # write only if absent; False when a lease exists
    def replace(self, text: str) -> None: ...
    def remove(self) -> None: ...


class LocalLeaseFile:
    """``RUN_DIR/_lease.json`` on a (possibly shared) filesystem; created by hard link (atomic create-if-absent)."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LEASE_NAME
        self.where = str(self.path)

    def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def create(self, text: str) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{host_identity()}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{LEASE_NAME}"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # atomic create-if-absent of a complete file
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def replace(self, text: str) -> None:
        atomic_write_text(self.path, text)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class LeaseHeld(StorageError):
    """Another driver holds (or may still hold) the run; the message names it and what to do."""


class RunLease:
    """The lease of one run directory (see module doc). Use ``acquire`` / ``release`` or ``with``."""

    def __init__(self, root: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S, clock: Callable[[], float] = time.time,
                 file: LeaseFile | None = None, name: str | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 seconds")
        self.root = Path(root)
        self.file: LeaseFile = file or LocalLeaseFile(self.root)
        self.name = name or str(self.root)  # the run as people name it (a URI on object storage), for messages
        self.on_release: list[Callable[[], None]] = []  # run by release() while the lease is still ours
        self.on_heartbeat: list[Callable[[], None]] = []  # run by the heartbeat thread after each renewal
        self.timeout_s = timeout_s
        self._clock = clock
        self.mine: Holder | None = None  # set while we hold the lease
        self.taken_over: tuple[Holder, str] | None = None  # the stale holder we replaced, and why it was stale
        self.lost: Holder | None = None  # who took the lease from us (a heartbeat found their token)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> Holder | None:
        """The current holder as the file says; None when no lease is held. Raises LeaseHeld if unreadable."""
        text = self.file.read()
        if text is None:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise LeaseHeld(f"{self.file.where}: unreadable lease ({e}); if no driver runs on {self.name}, delete "
                            f"it and rerun") from None

    def stale_reason(self, h: Holder) -> str | None:
        """Why ``h`` no longer holds the run, or None while it may (see module doc)."""
        if h.host_id == host_identity() and not pid_alive(h.pid, h.pid_start):
            return f"its process {h.pid} on this host is gone"
        age = self._clock() - h.heartbeat_ts
        if age > self.timeout_s:
            return f"no heartbeat for {age:.0f} s (timeout {self.timeout_s:.0f} s)"
        return None

    @property
    def held(self) -> bool:
        return self.mine is not None and self.lost is None

    def acquire(self, force: bool = False) -> Holder:
        """Take the lease, or raise LeaseHeld naming the holder. ``force`` takes over a lease stale by timeout."""
        now = self._clock()
        me = Holder(host=socket.gethostname(), host_id=host_identity(), pid=os.getpid(),
                    pid_start=proc_start(os.getpid()), since=utc_now(), since_ts=now, heartbeat_ts=now,
                    token=uuid.uuid4().hex)
        if not self.file.create(json.dumps(asdict(me))):
            self._take_over(me, force)
        self.mine = me
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        return me

    def _take_over(self, me: Holder, force: bool) -> None:
        h = self.holder()
        if h is None:  # released between our create and our read: try once more
            self.file.create(json.dumps(asdict(me)))
        else:
            why = self.stale_reason(h)
            if why is None:
                raise LeaseHeld(f"{self.name}: this run is being driven by {h.describe(self._clock())}; a second "
                                f"driver would redo every phase. Wait for it to finish or stop it. If it is gone "
                                f"without releasing the lease, the lease goes stale {self.timeout_s:.0f} s after its "
                                f"last heartbeat; then rerun with --force.")
            if h.host_id != host_identity() and not force:
                raise LeaseHeld(f"{self.name}: the run's lease is held by {h.describe(self._clock())}, which looks "
                                f"gone ({why}), but it ran on another host and cannot be checked from here. If that "
                                f"driver is really stopped, rerun with --force to take the run over.")
            self.taken_over = (h, why)
            self.file.replace(json.dumps(asdict(me)))
        now_holder = self.holder()
        if now_holder is None or now_holder.token != me.token:
            other = now_holder.describe(self._clock()) if now_holder else "nobody"
            raise LeaseHeld(f"{self.name}: another driver took the lease at the same moment ({other}); rerun later")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            if self.renew():
                for hook in self.on_heartbeat:
                    hook()

    def renew(self) -> bool:
        """Refresh our heartbeat; False (and ``lost`` set) when someone has taken the lease from us."""
        if self.mine is None or self.lost is not None:
            return False
        try:
            current = self.holder()
        except LeaseHeld:
            current = None
        if current is None or current.token != self.mine.token:
            self.lost = current or dataclasses.replace(self.mine, host="(nobody: the lease file was removed)")
            return False
        self.mine = Holder(**{**asdict(self.mine), "heartbeat_ts": self._clock()})
        self.file.replace(json.dumps(asdict(self.mine)))
        return True

    def check(self) -> None:
        """Raise LeaseHeld if the lease was taken from us; a driver calls it before each phase."""
        if self.lost is not None:
            raise LeaseHeld(f"{self.name}: while this driver ran, its lease was taken over by "
                            f"{self.lost.describe(self._clock())} (with --force, after {self.timeout_s:.0f} s without "
                            f"our heartbeat); stopping before the next phase so that two drivers do not both run it")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.mine is not None:
            try:
                while self.on_release:
                    self.on_release.pop(0)()
            finally:
                with contextlib.suppress(LeaseHeld):
                    current = self.holder()
                    if current is not None and current.token == self.mine.token:
                        self.file.remove()
                self.mine = None

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LEASE_NAME", "DEFAULT_TIMEOUT_S", "Holder", "LeaseFile", "LeaseHeld", "LocalLeaseFile", "RunLease"]
