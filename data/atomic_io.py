"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer in the project that replaces a file or a directory goes through here (run artefacts, exports,
reports, plots, checkpoints, caches). It sits in ``data/``, the bottom layer, so that ``rounds/`` and ``data/``
can use it without importing ``pipeline`` (DESIGN.md: dependencies point ``pipeline -> rounds -> mcts -> data``);
``pipeline.storage`` re-exports it.

A file is written under a temporary name in the same directory, fsynced and renamed into place, then the
directory is fsynced (a rename is only durable once the directory entry is). Temporary names carry their
writer's host identity and pid (``tmp_prefix``), so garbage collection can tell a dead writer's leftovers from a
live writer's file, even on a filesystem shared by several hosts.

Publishing: a run directory on object storage is worked on through a local staging directory
(``pipeline.storage.remote``). It registers a callback with ``publish_under(root, upload)``; every atomic write
below ``root`` is then handed to it right after the local rename, in the order the writes happen (a shard before
the manifest naming it, a checkpoint before the marker saying it is complete). ``published(path)`` does the same
for the few writers that rename by hand (the tree store's shard commit).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    """A file or run directory that cannot be used as it is; the message names the file and what to do."""


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created, with its directory, if missing) for the ``with`` block.
    Same host only; the kernel releases it if the process is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- publishing

_PUBLISHERS: dict[Path, Callable[[Path], None]] = {}  # staging root -> upload(path below it)


def publish_under(root: str | Path, upload: Callable[[Path], None]) -> None:
    """Hand every atomic write below ``root`` to ``upload(path)`` once it is in place (see module doc)."""
    _PUBLISHERS[Path(root).resolve()] = upload


def stop_publishing(root: str | Path) -> None:
    _PUBLISHERS.pop(Path(root).resolve(), None)


def published(path: str | Path) -> None:
    """Announce that ``path`` (a file or a directory) was just put in place or removed; publishes it if a root
    covers it."""
    if not _PUBLISHERS:
        return
    resolved = Path(path).resolve()
    for root, upload in list(_PUBLISHERS.items()):
        if resolved.is_relative_to(root):
            upload(resolved)


def remove_file(path: str | Path) -> None:
    """Delete ``path`` if present, and announce it (a publisher then deletes its copy: a cleared marker)."""
    Path(path).unlink(missing_ok=True)
    published(path)


# --------------------------------------------------------------------------------------------- writer identity


@functools.cache
def host_identity() -> str:
    """8 hex digits naming the pid namespace this process runs in: hostname, kernel boot and pid namespace.

    Two processes with the same identity can judge each other's pids; any other pid means nothing here.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this pid namespace runs (and, given its ``start`` time, is that same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return start is None or proc_start(pid) in (None, start)


def tmp_prefix() -> str:
    """A fresh temporary-file prefix naming its writer: host identity and pid (``TreeStore.collect_garbage``)."""
    return f".tmp-{host_identity()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f"{tmp_prefix()}-{path.name}{suffix}")


def fsync_dir(path: str | Path) -> None:
    # The rename is only durable once the directory entry is; without this a power cut can undo it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


# --------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Use it for writers that want a
    file name (``ParquetWriter``, ``savefig``)::

        with atomic_path(run.plot_path) as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)  # ends with path.name: savefig and friends still see the suffix
    try:
        yield tmp
        if not tmp.exists():
            raise StorageError(f"atomic write of {path}: the writer produced no file at {tmp}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    published(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 1, sort_keys: bool = True,
                      allow_nan: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file we wrote; a damaged one is reported with its path (atomic writes make that rare)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StorageError(f"{path}: not valid JSON ({e}); it was not written by this version, or the disk "
                           f"is damaged. Move it aside to redo what it records.") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it replaces ``path`` (e.g. a checkpoint).

    A previous ``path`` is moved aside and deleted only after the new directory is in place, so at any
    instant ``path`` is either absent, the old complete directory, or the new complete one.
    ``keep_existing``: when ``path`` appeared meanwhile (another process built the same cache), keep it and
    discard ours instead of replacing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, ".d")
    tmp.mkdir()
    try:
        yield tmp
        if not keep_existing:
            install_dir(tmp, path)
        elif not path.exists():
            try:
                os.rename(tmp, path)  # refused when another writer put a (non-empty) ``path`` in place meanwhile
            except OSError:
                if not path.exists():
                    raise
            else:
                fsync_dir(path.parent)
                published(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def install_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the complete directory ``tmp`` in place of ``path`` (see ``atomic_dir``; for writers that must choose
    the temporary name themselves, e.g. several processes saving one checkpoint)."""
    tmp, path = Path(tmp), Path(path)
    old = None
    try:
        if path.exists():
            old = _tmp_name(path, ".old")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old)
    published(path)


__all__ = ["StorageError", "file_lock", "utc_now", "publish_under", "stop_publishing", "published", "remove_file", "host_identity", "proc_start",
           "pid_alive", "tmp_prefix", "fsync_dir", "file_digest", "atomic_path", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "read_json", "atomic_dir", "install_dir"]
