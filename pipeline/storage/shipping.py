"""Work shipped to other nodes when the run is on object storage: its files travel through the store.

A driver works on a local staging copy of a run on object storage (``pipeline.storage.remote``); a Ray task or
actor on another node has no such copy. So what the driver ships (``RunDir.ship``: training and evaluation tasks,
the factories that engine actors call to load a checkpoint) names every file of the run by the run's URI and its
path in the run (``StoredPath``), never by the staging path, and the call (``ShippedCall``), wherever it runs:

1. makes each input a path in this node's cache (``NodeCache``: ``$OPEN_RSTAR_NODE_CACHE`` or
   ``<tmp>/open-rstar-node-cache``, one directory per run URI), downloading it unless the copy there matches the
   store (every object's size and modification time, as recorded when it was downloaded);
2. gives the function a local directory for its output: the store's complete copy when there is one (so a
   finished checkpoint is found and reused, as on a local run), else an empty one;
3. publishes the output when the function returns (``NodeCache.publish``): the completion object
   ``_COMPLETE.json`` is deleted, every file uploaded, objects an earlier version left deleted, and
   ``_COMPLETE.json`` (the file names and sizes) uploaded last. A directory written by shipped work is complete
   on the store only while it holds that object; an interrupted upload leaves it without one. Before the
   upload starts, the node records the finished output's files (size, modification time): a retry on this node
   whose copy still matches that record keeps it and publishes it (a checkpoint is not trained again because
   its upload was cut short), where an unrecorded or changed copy is emptied as an unfinished attempt;
4. returns the function's result. The driver then downloads the output's files, weights excepted, into its
   staging copy (``RunDir.fetch``) and writes the phase marker: what the rest of the round and a resume read.

Inputs are uploaded before the call is shipped (``StagedRun.sync_up``), so the store holds what the driver
sees. Several actors of one node loading the same checkpoint download it once: the node cache of a run is
locked (``flock``) while a path is downloaded or published. The node that ran a training task keeps its copy
of the output, recorded as downloaded, so evaluation or engines on that node do not download it again.
On a local run (a path, or ``file://``) nothing of this happens: ``RunDir.ship`` binds the function to its
arguments as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic_io import StorageError, file_lock, host_identity, utc_now
from pipeline.storage.remote import LOCAL_ONLY, ObjectStore

if TYPE_CHECKING:
    from pipeline.storage.remote import StagedRun

NODE_CACHE_ENV = "OPEN_RSTAR_NODE_CACHE"
COMPLETE = "_COMPLETE.json"  # the last object of a directory published by shipped work


@dataclasses.dataclass(frozen=True)
class StoredPath:
    """A file or directory of a run on object storage, as shipped work names it."""

    uri: str  # the run
    rel: str  # the path in the run, e.g. "round_1/policy"
    output: bool = False  # the call writes it (a checkpoint directory); else it reads it
    text: bool = False  # the function was given a str, not a Path


@dataclasses.dataclass(frozen=True)
class ShippedCall:
    """``fn(*args, **kwargs)`` with ``StoredPath`` arguments made local on the node that calls it (module doc)."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict

    def __call__(self) -> Any:
        outputs: list[tuple[NodeCache, str, dict]] = []

        def local(v: Any) -> Any:
            if not isinstance(v, StoredPath):
                return v
            cache = NodeCache(v.uri)
            path = cache.prepare_output(v.rel) if v.output else cache.materialise(v.rel)
            if v.output:
                outputs.append((cache, v.rel, _local_state(path)))
            return str(path) if v.text else path

        args = tuple(local(a) for a in self.args)
        kwargs = {k: local(v) for k, v in self.kwargs.items()}
        result = self.fn(*args, **kwargs)
        for cache, rel, before in outputs:
            cache.publish(rel, unchanged_since=before)
        return result


def call_shipped(call: Callable[[], Any]) -> Any:
    """Call ``call`` (what ``RunDir.ship`` returned): the body of the Ray task that runs shipped work."""
    return call()


def ship(staged: StagedRun, fn: Callable[..., Any], args: tuple, kwargs: dict, writes: Path | None) -> ShippedCall:
    """``fn`` with every argument that is a path in ``staged``'s copy named by the run instead; ``writes`` is the
    output directory. Each input is uploaded first unless the store holds it as it is (``StagedRun.sync_up``)."""
    out = Path(writes).resolve() if writes is not None else None

    def named(v: Any) -> Any:
        if not isinstance(v, (str, Path)) or not Path(v).is_absolute():
            return v  # a model name, a number, a config: travels as it is
        path = Path(v).resolve()
        if not path.is_relative_to(staged.local):
            return v
        rel = path.relative_to(staged.local).as_posix()
        if path == out:
            return StoredPath(staged.uri, rel, output=True, text=isinstance(v, str))
        if not path.exists():
            raise StorageError(f"{staged.uri}: {rel} is given to {getattr(fn, '__name__', fn)} on another node, but "
                               f"the driver's copy of the run has no such file or directory")
        staged.sync_up(rel)
        return StoredPath(staged.uri, rel, text=isinstance(v, str))

    if out is not None and not out.is_relative_to(staged.local):
        raise StorageError(f"{staged.uri}: the output {writes} of {getattr(fn, '__name__', fn)} is not in the run")
    return ShippedCall(fn, tuple(named(a) for a in args), {k: named(v) for k, v in kwargs.items()})


def node_cache_root() -> Path:
    return Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir()) / "open-rstar-node-cache")


def _local_state(path: Path) -> dict[str, tuple[int, int]]:
    """{file below ``path``: (size, mtime in ns)}; {} when it does not exist. For a file, its own name."""
    if path.is_file():
        return {path.name: (path.stat().st_size, path.stat().st_mtime_ns)}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


class NodeCache:
    """This node's copies of the files of one run on object storage: ``<root>/<hash of the URI>/<path in the
    run>``, with ``.meta/`` recording what the store held when each path was downloaded or published."""

    def __init__(self, uri: str, root: Path | None = None):
        self.store = ObjectStore(uri)
        key = hashlib.sha256(self.store.uri.encode()).hexdigest()[:16]
        self.dir = (root or node_cache_root()) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "uri.txt").write_text(self.store.uri + "\n")  # for people looking at the cache

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def _meta(self, rel: str) -> Path:
        return self.dir / ".meta" / f"{hashlib.sha256(rel.encode()).hexdigest()[:24]}.json"

    def _unpublished(self, rel: str) -> Path:
        """Where ``publish`` records a finished call's output (its files' size and mtime) until it is on the store."""
        return self._meta(rel).with_suffix(".unpublished")

    def _finished_here(self, rel: str) -> bool:
        """Whether the local copy of ``rel`` is a finished call's output whose publishing was cut short."""
        record = self._unpublished(rel)
        if not record.is_file():
            return False
        files = {k: list(v) for k, v in _local_state(self.path(rel)).items() if k != COMPLETE}
        return bool(files) and json.loads(record.read_text()) == files

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.dir / ".lock")

    def _recorded(self, rel: str) -> dict | None:
        meta = self._meta(rel)
        return json.loads(meta.read_text()) if meta.is_file() else None

    def _record(self, rel: str, entries: dict[str, tuple[int, int]]) -> None:
        meta = self._meta(rel)
        meta.parent.mkdir(exist_ok=True)
        tmp = meta.with_name(f".tmp-{meta.name}")
        tmp.write_text(json.dumps({"rel": rel, "objects": {k: list(v) for k, v in entries.items()}}))
        os.replace(tmp, meta)

    def _fresh(self, rel: str, entries: dict[str, tuple[int, int]]) -> bool:
        """Whether the local copy of ``rel`` is what the store holds now (``entries``: ObjectStore.entries)."""
        recorded = self._recorded(rel)
        if recorded is None or recorded["objects"] != {k: list(v) for k, v in entries.items()}:
            return False
        return all((self.dir / k).is_file() and (self.dir / k).stat().st_size == size
                   for k, (size, _) in entries.items())

    def materialise(self, rel: str) -> Path:
        """``rel`` (a file or a directory of the run) on this node: downloaded unless the copy here is current."""
        with self._locked():
            entries = self.store.entries(rel)
            if not entries:
                raise StorageError(f"{self.store.uri}: {rel} is not on the store; shipped work reads only what the "
                                   f"driver uploaded before shipping it (is the run's phase marker missing?)")
            local = self.path(rel)
            if not self._fresh(rel, entries):
                self._meta(rel).unlink(missing_ok=True)  # a download cut short is never taken for a copy
                if local.is_dir():
                    shutil.rmtree(local)
                for obj in sorted(entries):
                    self.store.get_file(obj, self.dir / obj)
                self._record(rel, entries)
            return local

    def prepare_output(self, rel: str) -> Path:
        """The local directory a call writes ``rel`` into: the store's complete copy when it has one (a finished
        checkpoint is then found, as on a local run), else emptied of an unfinished attempt's files."""
        with self._locked():
            local = self.path(rel)
            if self.store.entries(f"{rel}/{COMPLETE}"):
                entries = self.store.entries(rel)
                if not self._fresh(rel, entries):
                    self._meta(rel).unlink(missing_ok=True)
                    self._unpublished(rel).unlink(missing_ok=True)
                    if local.exists():
                        shutil.rmtree(local)
                    for obj in sorted(entries):
                        self.store.get_file(obj, self.dir / obj)
                    self._record(rel, entries)
            elif self._finished_here(rel):
                print(f"{self.store.uri}: {rel}: this node holds the finished output of an earlier call whose upload "
                      f"was cut short; it is reused and published", file=sys.stderr, flush=True)
            else:
                self._meta(rel).unlink(missing_ok=True)
                self._unpublished(rel).unlink(missing_ok=True)
                if local.exists():
                    shutil.rmtree(local)
            local.parent.mkdir(parents=True, exist_ok=True)
            return local

    def publish(self, rel: str, unchanged_since: dict | None = None) -> list[str]:
        """Upload the local directory ``rel`` to the store, ``_COMPLETE.json`` last (module doc); returns the
        objects written. Nothing is uploaded when the directory is the store's complete copy, unchanged since
        ``unchanged_since`` (``_local_state`` taken before the call)."""
        local = self.path(rel)
        with self._locked():
            state = _local_state(local)
            if not state:
                raise StorageError(f"{self.store.uri}: {rel} was to be written by this call, but {local} holds no "
                                   f"file")
            if unchanged_since == state and self.store.entries(f"{rel}/{COMPLETE}"):
                return []
            self._meta(rel).unlink(missing_ok=True)
            files = sorted(name for name in state if name != COMPLETE and Path(name).name not in LOCAL_ONLY)
            record = self._unpublished(rel)  # written before the store's copy is touched (module doc, step 3)
            record.parent.mkdir(exist_ok=True)
            tmp = record.with_name(f".tmp-{record.name}")
            tmp.write_text(json.dumps({k: list(v) for k, v in state.items() if k != COMPLETE}))
            os.replace(tmp, record)
            self.store.delete(f"{rel}/{COMPLETE}")  # from here until the end the directory is incomplete
            for name in files:
                self.store.put_file(local / name, f"{rel}/{name}")
            wanted = {f"{rel}/{name}" for name in files}
            for old in self.store.list(rel):
                if old not in wanted:
                    self.store.delete(old)
            done = {"files": {name: state[name][0] for name in files}, "host": host_identity(), "at": utc_now()}
            (local / COMPLETE).write_text(json.dumps(done, indent=2))
            self.store.put_file(local / COMPLETE, f"{rel}/{COMPLETE}")
            self._record(rel, self.store.entries(rel))  # this node's copy is current: no download to read it
            record.unlink()
            return [*sorted(wanted), f"{rel}/{COMPLETE}"]


__all__ = ["COMPLETE", "NODE_CACHE_ENV", "NodeCache", "ShippedCall", "StoredPath", "call_shipped", "node_cache_root",
           "ship"]
