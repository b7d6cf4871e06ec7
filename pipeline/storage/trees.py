"""The tree store: a round's node-table shards, committed so that a crash never leaves a lie on disk.

Shards follow a commit protocol:

1. the shard is written under a temporary name ``.tmp-<host>-<pid>-<uuid>.parquet`` (``TreeWriter``);
2. under an exclusive ``flock`` on ``_manifest.lock`` the manifest is re-read, problems somebody else
   committed meanwhile are dropped (the shard is rewritten without them), the shard is renamed to the next
   free ``part-NNNNN.parquet`` and the manifest naming it is written (temp + rename).

A SIGKILL before step 2 finishes leaves at most an unlisted file, which readers ignore and
``TreeStore.collect_garbage`` removes; its problems are simply redone. A problem id is in at most one
listed shard, so nothing is ever stored twice.

The manifest records each shard's size and sha256. A shard damaged later (truncated, bit rot, overwritten) is
reported as a ``StorageError`` naming the file; ``TreeStore.repair`` (run by the driver when a run is continued)
moves it to ``trees/_corrupt/`` and drops it from the manifest, so its problems are pending again and redone.

On object storage (``pipeline.storage.remote``) the same protocol runs in the local staging copy and every
rename is published in order: the shard (a new object name, never rewritten once listed) before the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data.atomic_io import (
    StorageError,
    atomic_write_json,
    file_digest,
    file_lock,
    fsync_dir,
    host_identity,
    pid_alive,
    published,
    read_json,
    tmp_prefix,
    utc_now,
)

if TYPE_CHECKING:  # pyarrow is imported lazily: `python -m pipeline info --help` should not pay for it
    import pyarrow as pa

    from pipeline.lease import RunLease

MANIFEST_NAME = "_manifest.json"
PLAN_NAME = "_plan.json"
MANIFEST_FORMAT = 1
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
# Temporary files: .tmp-<host identity>-<pid>-<uuid>...; before host identities: .tmp-<pid>-<uuid>...
_TMP_RE = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d+)-[0-9a-f]{12}")
_LEGACY_TMP_RE = re.compile(r"^\.tmp-(\d+)-[0-9a-f]+")
CORRUPT_DIR = "_corrupt"  # trees/_corrupt/: damaged shards moved aside by TreeStore.repair (kept as evidence)
TREES_ID_COLUMN = "problem_id"  # the node-table column naming a row's tree (data.schemas.TREES_SCHEMA)


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard as the manifest lists it."""

    file: str  # name inside trees/
    rows: int
    problems: tuple[str, ...]  # in the order their rows appear in the file
    solved: tuple[str, ...]  # the subset of ``problems`` with a correct final answer (as the writer was told)
    written_at: str
    size: int = -1  # bytes of the file as committed; -1 (with sha256 "") in manifests written before checksums
    sha256: str = ""

    def to_json(self) -> dict:
        return {"file": self.file, "rows": self.rows, "problems": list(self.problems),
                "solved": list(self.solved), "written_at": self.written_at, "size": self.size,
                "sha256": self.sha256}

    @staticmethod
    def from_json(d: dict) -> ShardInfo:
        return ShardInfo(file=d["file"], rows=int(d["rows"]), problems=tuple(d["problems"]),
                         solved=tuple(d.get("solved", ())), written_at=d.get("written_at", ""),
                         size=int(d.get("size", -1)), sha256=d.get("sha256", ""))


class TreeStore:
    """The node-table shards of one round: commit (via ``writer``), list, stream back, clean up."""

    def __init__(self, trees_dir: str | Path, schema: pa.Schema | None = None, id_column: str | None = None,
                 lease: RunLease | None = None):
        self.dir = Path(trees_dir)
        self._schema = schema
        self._id_column = id_column
        self.lease = lease  # the run lease when we hold it: lets collect_garbage judge other hosts' files

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            from data.schemas import TREES_SCHEMA

            self._schema = TREES_SCHEMA
        return self._schema

    @property
    def id_column(self) -> str:
        return self._id_column or TREES_ID_COLUMN

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    # ---- reading

    def shards(self) -> list[ShardInfo]:
        """Committed shards in commit order ([] before the first commit)."""
        if not self.manifest_path.exists():
            return []
        data = read_json(self.manifest_path)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise StorageError(f"{self.manifest_path}: unknown manifest format {data.get('format')!r} "
                               f"(expected {MANIFEST_FORMAT}); written by another version of open-rstar?")
        return [ShardInfo.from_json(s) for s in data["shards"]]

    def completed_problem_ids(self) -> set[str]:
        """Problems whose tree is committed; resume redoes every other problem of the round."""
        return {pid for s in self.shards() for pid in s.problems}

    def solved_problem_ids(self) -> set[str]:
        return {pid for s in self.shards() for pid in s.solved}

    def write_plan(self, problem_ids: Sequence[str]) -> None:
        """Record the round's problem ids (the denominator of progress; resume's to-do list)."""
        ids = list(problem_ids)
        if len(set(ids)) != len(ids):
            dup = sorted({p for p in ids if ids.count(p) > 1})[:5]
            raise StorageError(f"{self.dir / PLAN_NAME}: duplicate problem ids {dup}; ids must be unique")
        atomic_write_json(self.dir / PLAN_NAME, {"problems": ids, "written_at": utc_now()})

    def plan(self) -> list[str] | None:
        """The ids recorded by ``write_plan``; None when no plan was written."""
        path = self.dir / PLAN_NAME
        return list(read_json(path)["problems"]) if path.exists() else None

    def pending_problem_ids(self) -> list[str]:
        """Planned problems without a committed tree, in plan order."""
        plan = self.plan()
        if plan is None:
            raise StorageError(f"{self.dir / PLAN_NAME}: no plan; call write_plan(problem_ids) first")
        done = self.completed_problem_ids()
        return [p for p in plan if p not in done]

    def iter_trees(self, columns: Sequence[str] | None = None, batch_size: int = 4096) -> Iterator[pa.Table]:
        """Yield each committed problem's node table, one problem at a time, in commit order.

        Memory is one tree plus one record batch, whatever the number of trees: shards are read batch by
        batch and a problem's rows are contiguous in its shard (the writer writes them so).
        """
        import pyarrow as pa

        cols = None if columns is None else list(dict.fromkeys([self.id_column, *columns]))
        for shard in self.shards():
            if why := self.check_shard(shard):
                raise self._damaged(shard, why)
            expected = list(shard.problems)
            seen: list[str] = []
            current: str | None = None
            pending: list[pa.RecordBatch] = []
            for batch in self._batches(shard, batch_size, cols):
                ids = batch.column(self.id_column).to_pylist()
                start = 0
                for i in range(1, len(ids) + 1):
                    if i < len(ids) and ids[i] == ids[start]:
                        continue
                    pid = ids[start]
                    if pid != current:
                        if current is not None:
                            yield pa.Table.from_batches(pending)
                            seen.append(current)
                        current, pending = pid, []
                    pending.append(batch.slice(start, i - start))
                    start = i
            if current is not None:
                yield pa.Table.from_batches(pending)
                seen.append(current)
            if seen != expected:
                raise self._damaged(shard, f"holds problems {seen[:5]}... but the manifest lists {expected[:5]}...")

    def _batches(self, shard: ShardInfo, batch_size: int, cols: list[str] | None) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            yield from pq.ParquetFile(self.dir / shard.file).iter_batches(batch_size=batch_size, columns=cols)
        except (OSError, pa.ArrowException) as e:  # a shard without a checksum (older manifest) damaged mid-file
            raise self._damaged(shard, f"unreadable ({type(e).__name__}: {e})") from None

    # ---- integrity

    def check_shard(self, shard: ShardInfo) -> str | None:
        """Why the file of a committed shard cannot be trusted, or None when it is the file that was committed.

        With a recorded checksum the size and sha256 must match; a shard from a manifest without checksums
        must at least have a readable parquet footer with the recorded row count.
        """
        path = self.dir / shard.file
        if not path.is_file():
            return "missing"
        if shard.sha256:
            size, digest = file_digest(path)
            if size != shard.size:
                return f"{size} bytes but {shard.size} when committed (truncated or overwritten)"
            if digest != shard.sha256:
                return f"sha256 {digest[:16]}... but {shard.sha256[:16]}... when committed (the content changed)"
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            return f"not a readable parquet file ({type(e).__name__}: {e})"
        return None if rows == shard.rows else f"{rows} rows but {shard.rows} when committed"

    def _damaged(self, shard: ShardInfo, why: str) -> StorageError:
        run_dir = self.dir.parent.parent
        return StorageError(f"{self.dir / shard.file}: damaged: {why}. It is listed in {self.manifest_path} with "
                            f"{len(shard.problems)} problems. Continue the run (python -m pipeline.resume {run_dir}): "
                            f"it moves the shard to {CORRUPT_DIR}/ and redoes those problems.")

    def verify(self) -> list[tuple[ShardInfo, str]]:
        """Every committed shard that ``check_shard`` rejects, with the reason (reads every shard once)."""
        return [(s, why) for s in self.shards() if (why := self.check_shard(s))]

    def repair(self) -> list[tuple[ShardInfo, str]]:
        """Move every damaged shard to ``trees/_corrupt/`` and drop it from the manifest; return what was dropped.

        The dropped shards' problems are then pending (``pending_problem_ids``) and are redone by the next
        rollouts phase. The file is moved, not deleted, so nothing is lost that someone may want to inspect.
        """
        if not self.manifest_path.exists():
            return []
        with self._locked():
            shards = self.shards()
            bad = [(s, why) for s in shards if (why := self.check_shard(s))]
            if not bad:
                return []
            aside = self.dir / CORRUPT_DIR
            aside.mkdir(exist_ok=True)
            stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
            for s, _ in bad:
                if (self.dir / s.file).exists():
                    os.replace(self.dir / s.file, aside / f"{stamp}-{s.file}")
                    published(aside / f"{stamp}-{s.file}")  # on object storage: the evidence is uploaded,
                    published(self.dir / s.file)  # and the damaged object deleted
            dropped = {s.file for s, _ in bad}
            atomic_write_json(self.manifest_path, {"format": MANIFEST_FORMAT,
                                                   "shards": [s.to_json() for s in shards if s.file not in dropped]})
            fsync_dir(aside)
        return bad

    # ---- writing

    def writer(self, shard_problems: int = 8, max_age_s: float | None = None) -> TreeWriter:
        return TreeWriter(self, shard_problems, max_age_s)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.dir / "_manifest.lock")

    def _commit(self, tmp: Path, table: pa.Table, problems: list[str], solved: set[str]) -> ShardInfo | None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with self._locked():
            shards = self.shards()
            done = {pid for s in shards for pid in s.problems}
            keep = [p for p in problems if p not in done]
            if not keep:
                tmp.unlink()
                return None
            if len(keep) < len(problems):
                # Another writer committed some of these problems meanwhile; theirs wins, ours are dropped.
                table = table.filter(pc.is_in(table.column(self.id_column), value_set=pa.array(keep)))
                pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            used = [int(m.group(1)) for name in [*(s.file for s in shards), *os.listdir(self.dir)]
                    if (m := SHARD_RE.match(name))]
            name = f"part-{max(used, default=-1) + 1:05d}.parquet"
            size, digest = file_digest(tmp)
            os.replace(tmp, self.dir / name)
            fsync_dir(self.dir)
            published(self.dir / name)  # on object storage: the shard's object before the manifest naming it
            info = ShardInfo(file=name, rows=table.num_rows, problems=tuple(keep),
                             solved=tuple(p for p in keep if p in solved), written_at=utc_now(),
                             size=size, sha256=digest)
            # The manifest goes last: until it names the shard, the shard does not exist for anyone.
            atomic_write_json(self.manifest_path, {"format": MANIFEST_FORMAT,
                                                   "shards": [s.to_json() for s in [*shards, info]]})
            return info

    def collect_garbage(self) -> list[Path]:
        """Remove shards the manifest does not list and temporary files whose writer is gone; return them.

        Run it on resume, before writing. A temporary file names its writer's host identity and pid
        (``tmp_prefix``). On this host the writer is gone when its pid is dead. A pid from another host (on a
        shared filesystem) means nothing here, so such a file is removed only while we hold the run lease and the
        file is older than our lease: its writer belonged to a driver that no longer holds the run. Without the
        lease it is kept (and ignored by readers), never deleted under a live writer.
        """
        if not self.dir.exists():
            return []
        removed: list[Path] = []
        with self._locked():
            listed = {s.file for s in self.shards()}
            for name in sorted(os.listdir(self.dir)):
                path = self.dir / name
                if (SHARD_RE.match(name) and name not in listed) or self._writer_gone(path):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    if SHARD_RE.match(name):
                        published(path)  # on object storage: an upload the crash left unlisted is deleted too
                    removed.append(path)
        return removed


    def _writer_gone(self, path: Path) -> bool:
        """Whether ``path`` is a temporary file whose writer is gone (see ``collect_garbage``)."""
        if m := _TMP_RE.match(path.name):
            if m.group(1) == host_identity():
                return not pid_alive(int(m.group(2)))
        elif not _LEGACY_TMP_RE.match(path.name):
            return False  # not a temporary file
        lease = self.lease  # another host's file, or one named before host identities: its pid means nothing here
        return lease is not None and lease.held and path.stat().st_mtime < lease.mine.since_ts


# ----------------------------------------------------------------------------------------------- the writer

SOLVED_COLUMN, SOLVED_VALUE = "verdict", "correct"  # a tree with such a row is solved (mcts.node.Verdict)


class TreeWriter:
    """Buffers finished trees and commits them as shards of ``shard_problems`` problems.

    ``append`` is idempotent by problem id: a problem already committed (by anyone) or already buffered is
    skipped and ``False`` returned, so a tree can never be stored twice. Use as a context manager, or call
    ``close()``: whatever is buffered at a clean exit is committed; after an exception it is not (the
    problems are redone on resume, exactly as after a crash).

    ``max_age_s`` bounds how long a finished tree may wait in the buffer when problems finish slowly: the
    buffer is committed once its oldest tree is that old, checked on ``append`` and on ``flush_if_stale``
    (which a driver calls between waves). None waits for ``shard_problems`` trees or ``close``.
    """

    def __init__(self, store: TreeStore, shard_problems: int = 8, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if shard_problems < 1:
            raise ValueError(f"shard_problems={shard_problems}: must be >= 1")
        if max_age_s is not None and not max_age_s >= 0:
            raise ValueError(f"max_age_s={max_age_s}: must be >= 0 seconds, or None")
        self.store = store
        self.shard_problems = shard_problems
        self.max_age_s = max_age_s
        self._clock = clock
        self._oldest = 0.0  # clock() when the first tree of the current buffer arrived
        self._committed = store.completed_problem_ids()
        self._buffer: list[tuple[str, pa.Table]] = []
        self._solved: set[str] = set()
        self.skipped: list[str] = []  # ids refused as duplicates, for the caller to report

    def append(self, problem_id: str, rows: pa.Table | Iterable[dict], solved: bool | None = None) -> bool:
        """Queue one problem's node-table rows; commit a shard when ``shard_problems`` are queued.

        ``solved`` feeds the manifest's solve rate; None derives it from the rows (a ``verdict='correct'``
        row means a correct terminal, ``mcts.node``), which needs that column in the schema.
        """
        if problem_id in self._committed or any(pid == problem_id for pid, _ in self._buffer):
            self.skipped.append(problem_id)
            return False
        table = self._as_table(problem_id, rows)
        if solved is None:
            if SOLVED_COLUMN not in table.column_names:
                raise StorageError(f"tree of problem {problem_id!r}: pass solved=True/False; the schema has no "
                                   f"{SOLVED_COLUMN!r} column to derive it from")
            solved = SOLVED_VALUE in table.column(SOLVED_COLUMN).to_pylist()
        if not self._buffer:
            self._oldest = self._clock()
        self._buffer.append((problem_id, table))
        if solved:
            self._solved.add(problem_id)
        if len(self._buffer) >= self.shard_problems:
            self.flush()
        else:
            self.flush_if_stale()
        return True

    def flush_if_stale(self) -> ShardInfo | None:
        """Commit the buffer if its oldest tree has waited ``max_age_s`` or longer (see class doc)."""
        if self._buffer and self.max_age_s is not None and self._clock() - self._oldest >= self.max_age_s:
            return self.flush()
        return None

    def _as_table(self, problem_id: str, rows: pa.Table | Iterable[dict]) -> pa.Table:
        import pyarrow as pa

        schema, col = self.store.schema, self.store.id_column
        try:
            if isinstance(rows, pa.Table):
                table = rows.select(schema.names).cast(schema)
            else:
                table = pa.Table.from_pylist(list(rows), schema=schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StorageError(f"tree of problem {problem_id!r}: rows do not fit the trees schema "
                               f"({type(e).__name__}: {e})") from None
        if table.num_rows == 0:
            raise StorageError(f"tree of problem {problem_id!r}: no rows; a tree has at least its root")
        ids = set(table.column(col).to_pylist())
        if ids != {problem_id}:
            raise StorageError(f"tree of problem {problem_id!r}: column {col!r} holds {sorted(map(str, ids))[:3]}; "
                               f"every row must carry the problem id it is appended under")
        return table

    def flush(self) -> ShardInfo | None:
        """Commit the buffered problems as one shard now (None when nothing new was buffered)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return None
        problems = [pid for pid, _ in self._buffer]
        table = pa.concat_tables([t for _, t in self._buffer])
        self.store.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.store.dir / f"{tmp_prefix()}.parquet"
        try:
            pq.write_table(table, tmp)
            info = self.store._commit(tmp, table, problems, self._solved)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._committed.update(problems)
        self._buffer.clear()
        self._solved.clear()
        return info

    @property
    def buffered(self) -> list[str]:
        return [pid for pid, _ in self._buffer]

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


__all__ = ["ShardInfo", "TreeStore", "TreeWriter", "CORRUPT_DIR", "MANIFEST_NAME", "PLAN_NAME", "SHARD_RE",
           "TREES_ID_COLUMN"]
