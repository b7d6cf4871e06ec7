"""Run directories on object storage (``s3://``, ``gs://``, any ``pyarrow.fs`` URI), through a local staging copy.

Everything in a run that writes a file wants a local path: parquet writers, HF ``save_pretrained``, matplotlib,
the append-only log. So a run directory on object storage is worked on in a fresh local *staging* directory:

1. ``RunDir.open(uri)`` makes the staging directory; ``acquire_lease`` takes the run lease on the store
   (``ObjectLeaseFile``) and only then downloads the run (``StagedRun.pull``): the copy is not read while
   another driver may still be writing it.
2. Every atomic write below the staging directory (``data.atomic_io``: a shard, the manifest, a marker, an
   export, a checkpoint directory) is uploaded right after its local rename, by the same thread, so objects appear
   on the store in the order the files were committed: a shard before the manifest naming it, a checkpoint
   before the phase marker saying it is done. ``log.jsonl`` (appended, not atomic) is uploaded, up to its last
   complete line: after each phase marker, at each heartbeat of the lease (every 30 s by default, also while
   nothing is committed, as during training), with a commit when ``LOG_EVERY_S`` (30 s) have passed since it
   last went up, and when the lease is released. Files that other processes of this node wrote into the staging
   copy are uploaded before each phase marker (``sync_up``). Work shipped to other nodes (training and
   evaluation Ray tasks, engine actors loading a checkpoint) never sees the staging copy: it reads and writes
   the run through the store (``pipeline.storage.shipping``). ``sync_up`` takes a file to be on the store as it is
   when its size and modification time are what they were when this process last uploaded or downloaded it; any
   other file below the path (new, or rewritten since, whatever its size) goes up.
3. Releasing the lease syncs the run up (the log included), removes the staging directory, then the lease object.

Guarantees on object storage (what holds instead of flock / fsync / rename):
- one PUT is atomic: a reader sees the old object or the new one (S3, GCS; a large file goes as a multipart
  upload, which also appears whole on completion). S3 and GCS are strongly consistent for read-after-write
  and list-after-write, so a manifest read after its PUT names only shards already uploaded;
- a shard object is written under a name no committed manifest listed before and never rewritten after the
  manifest lists it; the manifest carries each shard's size and sha256, so a damaged or replaced object is
  detected and its problems redone (``TreeStore.repair``), as locally;
- no conditional writes (pyarrow.fs has no if-none-match / generation match), so single-writer is the lease's
  job: create-if-absent is "read, write, wait ``settle_s``, read back our token". Two drivers starting within
  the same instant both see absent, both write, and the read-back after ``settle_s`` tells the loser; it fails
  only if a driver stalls longer than ``settle_s`` between its read and its write;
- what a crash loses: the problems in flight (as locally), and the log lines since the last heartbeat (30 s
  by default: ``lease timeout / 4``); the staging directory of a killed driver stays on its local disk (under ``OPEN_RSTAR_STAGING`` or the
  system temp directory); it is never reused, and the next run staged there on the same host removes it.
Removals are published too: a cleared marker (``data.atomic_io.remove_file``), a damaged shard moved to
``trees/_corrupt/`` (the copy is uploaded there) and an unlisted shard removed by garbage collection are deleted
on the store. Readers trust only what the manifest and the markers name in any case.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from data.atomic_io import StorageError, host_identity, pid_alive, publish_under, stop_publishing

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_ONLY = ("_lease.json", "_manifest.lock")  # never uploaded: the lease lives on the store itself
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # what a read-only pull may skip
LOG_NAME = "log.jsonl"
LOG_EVERY_S = 30.0  # a commit uploads the log when it went up longer ago (besides markers and heartbeats)


def uri_scheme(run_dir: str | os.PathLike) -> str | None:
    m = _URI_RE.match(str(run_dir))
    return m.group(1).lower() if m else None


def is_remote(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` names object storage (any URI but ``file://``)."""
    return uri_scheme(run_dir) not in (None, "file")


def local_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a local path (``file://`` URIs included); object-store URIs are refused with a StorageError.

    Without this check ``Path("s3://b/run")`` would quietly become a local directory named ``s3:``.
    """
    text = str(run_dir)
    if uri_scheme(text) == "file":
        return Path(text[len("file://"):])
    if is_remote(text):
        raise StorageError(f"{text}: an object-store run directory has no local path; open it with "
                           f"RunDir.open(), which stages it locally")
    return Path(text)


def _s3_endpoint() -> str | None:
    # The AWS SDKs' standard variables; pyarrow's S3 client does not read them itself.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_at(endpoint: str):
    """An S3 filesystem on a non-AWS server (MinIO, Ceph, moto): ``http(s)://host:port`` from AWS_ENDPOINT_URL."""
    from urllib.parse import urlparse

    from pyarrow import fs

    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme or "https",
                           region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def _gcs_at(emulator: str):
    """A GCS filesystem on an emulator (``STORAGE_EMULATOR_HOST``, as Google's client libraries read it): anonymous,
    ``http(s)://host:port``. pyarrow's own GCS client does not read the variable."""
    from urllib.parse import urlparse

    from pyarrow import fs

    url = urlparse(emulator if "://" in emulator else f"http://{emulator}")
    return fs.GcsFileSystem(anonymous=True, scheme=url.scheme or "http", endpoint_override=url.netloc)


class ObjectStore:
    """A prefix on a ``pyarrow.fs`` filesystem, addressed by paths relative to it ("round_1/trees/x")."""

    def __init__(self, uri: str):
        from pyarrow import fs

        self.uri = uri.rstrip("/")
        try:
            if uri_scheme(self.uri) == "s3" and (endpoint := _s3_endpoint()):
                self.fs, base = _s3_at(endpoint), self.uri[len("s3://"):]
            elif uri_scheme(self.uri) == "gs" and (emulator := os.environ.get("STORAGE_EMULATOR_HOST")):
                self.fs, base = _gcs_at(emulator), self.uri[len("gs://"):]
            else:
                self.fs, base = fs.FileSystem.from_uri(self.uri)
        except (ValueError, OSError) as e:  # unknown scheme, no credentials, bad bucket name
            raise StorageError(f"{self.uri}: cannot open this object store ({type(e).__name__}: {e}); for s3:// "
                               f"set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION (and AWS_ENDPOINT_URL "
                               f"for a non-AWS server)") from None
        self.base = base.rstrip("/")

    def key(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _failed(self, what: str, rel: str, e: OSError) -> StorageError:
        return StorageError(f"{self.uri}: {what} {rel or '(the run)'} failed ({type(e).__name__}: {e}); check the "
                            f"endpoint, the credentials and the bucket, then rerun: nothing committed is lost")

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's content, None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._failed("reading", rel, e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self.key(rel)) as f:  # one PUT (or multipart) on close: atomic
                f.write(data)
        except OSError as e:
            raise self._failed("writing", rel, e) from None

    def put_file(self, local: Path, rel: str) -> None:
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(self.key(rel)) as dst:
                while block := src.read(8 << 20):
                    dst.write(block)
        except OSError as e:
            raise self._failed("uploading", rel, e) from None

    def get_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".dl-{local.name}")
        try:
            with self.fs.open_input_stream(self.key(rel)) as src, open(tmp, "wb") as dst:
                while block := src.read(8 << 20):
                    dst.write(block)
        except OSError as e:
            raise self._failed("downloading", rel, e) from None
        os.replace(tmp, local)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.key(rel))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._failed("deleting", rel, e) from None

    def entries(self, rel: str) -> dict[str, tuple[int, int]]:
        """{path relative to the run: (size, modification time in ns)} of the object ``rel``, or of every object
        below ``rel`` when it names a directory; {} when there is none."""
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(self.key(rel))
        except OSError as e:
            raise self._failed("listing", rel, e) from None
        if info.type == fs.FileType.File:
            return {rel: (info.size, info.mtime_ns or 0)}
        return {i.path[len(self.base) + 1:]: (i.size, i.mtime_ns or 0) for i in self._below(rel)}

    def list(self, rel: str = "") -> dict[str, int]:
        """{path relative to the run: size} of every object below ``rel``."""
        return {i.path[len(self.base) + 1:]: i.size for i in self._below(rel)}

    def _below(self, rel: str) -> list:
        """The ``FileInfo`` of every object (file) below ``rel``."""
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(self.key(rel), recursive=True, allow_not_found=True))
        except OSError as e:
            raise self._failed("listing", rel, e) from None
        return [i for i in infos if i.type == fs.FileType.File]


class ObjectLeaseFile:
    """The run lease as an object (``pipeline.lease.RunLease`` backend); see the module doc for its guarantee."""

    def __init__(self, store: ObjectStore, name: str, settle_s: float = 1.0):
        self.store, self.name, self.settle_s = store, name, settle_s
        self.where = store.key(name)

    def read(self) -> str | None:
        data = self.store.read_bytes(self.name)
        return None if data is None else data.decode("utf-8")

    def create(self, text: str) -> bool:
        """Write ``text`` if no lease exists; True when, ``settle_s`` later, the object still holds it."""
        if self.read() is not None:
            return False
        self.store.write_bytes(self.name, text.encode("utf-8"))
        time.sleep(self.settle_s)
        return self.read() == text

    def replace(self, text: str) -> None:
        """Overwrite the lease, then wait ``settle_s``: a take-over's read-back then sees a rival's write too."""
        self.store.write_bytes(self.name, text.encode("utf-8"))
        time.sleep(self.settle_s)

    def remove(self) -> None:
        self.store.delete(self.name)


_STAGING_PREFIX = "open-rstar-run-"
_STAGING_RE = re.compile(r"^open-rstar-run-([0-9a-f]{8})-(\d+)-")


def _remove_dead_staging(root: Path) -> None:
    """Remove staging directories that killed drivers of this host left in ``root`` (their pid is gone)."""
    for p in root.glob(f"{_STAGING_PREFIX}*"):
        m = _STAGING_RE.match(p.name)
        if m and m.group(1) == host_identity() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


class StagedRun:
    """The local staging copy of one run directory on object storage (module doc)."""

    def __init__(self, uri: str, staging_root: str | Path | None = None):
        self.store = ObjectStore(uri)
        self.uri = self.store.uri
        root = Path(staging_root or os.environ.get("OPEN_RSTAR_STAGING") or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(root)
        self.local = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{host_identity()}-{os.getpid()}-",
                                           dir=root)).resolve()
        self.publishing = False
        # {path in the run: local (size, mtime ns)} of files whose object holds exactly that copy: recorded when
        # this process uploads or downloads a file (the publisher's thread and the driver's both record).
        self._synced: dict[str, tuple[int, int]] = {}
        self._log_lock = threading.Lock()
        self._log_sent_at = time.monotonic()

    def lease_file(self, settle_s: float = 1.0) -> ObjectLeaseFile:
        from pipeline.lease import LEASE_NAME

        return ObjectLeaseFile(self.store, LEASE_NAME, settle_s)

    def pull(self, skip: Callable[[str], bool] | None = None) -> int:
        """Download every object of the run into the staging directory; returns how many were downloaded."""
        n = 0
        for rel in sorted(self.store.list()):
            if skip is not None and skip(rel):  # the lease object comes too: info shows who holds the run
                continue
            self._get(rel)
            n += 1
        return n

    def _put(self, path: Path, rel: str) -> None:
        st = path.stat()  # taken first: a write during the upload leaves the file newer than recorded
        self.store.put_file(path, rel)
        self._synced[rel] = (st.st_size, st.st_mtime_ns)

    def _get(self, rel: str) -> None:
        local = self.local / rel
        self.store.get_file(rel, local)
        st = local.stat()
        self._synced[rel] = (st.st_size, st.st_mtime_ns)

    def upload(self, path: Path) -> None:
        """Upload a file, or a directory's files, from the staging copy to the same place on the store.

        A replaced directory (a checkpoint) is uploaded file by file, then objects of its previous version
        that the new one lacks are deleted; the phase marker written after it is what says it is complete.
        """
        rel = path.resolve().relative_to(self.local).as_posix()
        if not path.exists():  # removed (a cleared marker): remove its object too
            self.store.delete(rel)
            self._synced.pop(rel, None)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            wanted = {f"{rel}/{p.relative_to(path).as_posix()}" for p in files}
            for p in files:
                self._put(p, f"{rel}/{p.relative_to(path).as_posix()}")
            for old in self.store.list(rel):  # paths relative to the run, like ``wanted``
                if old not in wanted:
                    self.store.delete(old)
                    self._synced.pop(old, None)
        elif path.name not in LOCAL_ONLY and not path.name.startswith(".tmp-"):
            self._put(path, rel)
        if self.log_due():  # a commit: the log goes too, now and then
            self.upload_log()

    def log_due(self) -> bool:
        return time.monotonic() - self._log_sent_at >= LOG_EVERY_S

    def upload_log_on_heartbeat(self) -> None:
        """The lease's heartbeat hook: upload the log, also while nothing is committed (training). A failure is
        logged and retried at the next beat; the thread must go on renewing the lease."""
        try:
            self.upload_log()
        except StorageError as e:
            logging.getLogger(__name__).warning("log.jsonl not uploaded (retried at the next heartbeat): %s", e)

    def upload_log(self) -> None:
        """Upload ``log.jsonl`` up to its last complete line (other threads may be appending to it)."""
        with self._log_lock:
            log = self.local / LOG_NAME
            if log.is_file():
                data = log.read_bytes()
                self.store.write_bytes(LOG_NAME, data[:data.rfind(b"\n") + 1])
            self._log_sent_at = time.monotonic()

    def sync_up(self, rel: str) -> list[str]:
        """Upload every file below ``rel`` that the store lacks, holds with another size, or that changed here since
        this process last uploaded or downloaded it (size or modification time other than recorded); return their
        paths. The log goes up by ``upload_log`` (complete lines only).

        Run before a phase marker: a file written by another process on this node (a Ray task training on the
        local GPU) never passed through this process's publisher, and must be on the store before the marker.
        Comparing sizes alone missed a file rewritten with the same size (a JSON counter, a fixed-size array)."""
        base = self.local / rel
        stored = self.store.entries(rel)
        sent = []
        for p in [base] if base.is_file() else sorted(base.rglob("*")):
            r = p.relative_to(self.local).as_posix()
            if not p.is_file() or p.name in LOCAL_ONLY or p.name.startswith((".tmp-", ".dl-")) or r == LOG_NAME:
                continue
            st = p.stat()
            if stored.get(r, (None,))[0] != st.st_size or self._synced.get(r) != (st.st_size, st.st_mtime_ns):
                self._put(p, r)
                sent.append(r)
        if rel in ("", LOG_NAME):
            self.upload_log()
        return sent

    def fetch(self, rel: str) -> list[str]:
        """Download the objects below ``rel`` that work shipped to another node published (``pipeline.storage.
        shipping``) into the staging copy, checkpoint weights excepted: on this driver only shipped work reads
        them, and it reads them from the store. Returns the paths downloaded."""
        got = []
        if (self.local / rel).is_dir():  # an earlier version's files (a resumed run's download) must not linger
            shutil.rmtree(self.local / rel)
        for obj in sorted(self.store.entries(rel)):
            if not obj.endswith(WEIGHT_SUFFIXES):
                self._get(obj)
                got.append(obj)
        if not got:
            raise StorageError(f"{self.uri}: {rel} is not on the store after the work that writes it returned; "
                               f"rerun the round (its phase was not marked done)")
        return got

    def start_publishing(self) -> None:
        publish_under(self.local, self.upload)
        self.publishing = True

    def close(self) -> None:
        """Sync the run up (when publishing: the log, anything written by other processes), stop publishing and
        remove the staging directory."""
        if self.publishing:
            self.sync_up("")
            stop_publishing(self.local)
            self.publishing = False
        shutil.rmtree(self.local, ignore_errors=True)


__all__ = ["ObjectStore", "ObjectLeaseFile", "StagedRun", "is_remote", "local_run_dir", "uri_scheme", "LOCAL_ONLY",
           "WEIGHT_SUFFIXES"]
