"""The tree writer: buffers finished trees and commits them to a ``TreeStore`` as whole-problem shards."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from data.atomic_io import StorageError, tmp_prefix

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.storage.trees import ShardInfo, TreeStore

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


__all__ = ["TreeWriter"]
