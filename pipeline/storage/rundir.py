"""The run directory: paths, the stored config and completion markers of one run.

Layout (DESIGN.md, "Storage layout of a run")::

    runs/NAME/                       or s3://bucket/prefix/NAME/ (pipeline.storage.remote)
      config.yaml                    resolved config, written first
      log.jsonl                      structured log (pipeline.runlog)
      _lease.json                    the driving process while one runs (pipeline.lease)
      round_N/
        trees/_plan.json             the round's problem ids (the "total" of progress and info)
        trees/part-00000.parquet     node-table shards, whole problems only (pipeline.storage.trees)
        trees/_manifest.json         the committed shards, the problem ids, size and sha256 of each: the only truth
        trees/_corrupt/              damaged shards moved aside by TreeStore.repair
        sft.parquet  ppm_pairs.parquet  steps.parquet  trees.parquet   exports (pipeline.export)
        policy/  ppm/                HF checkpoints (written via ``atomic_dir``; by a task on another node of a
                                     run on object storage: uploaded with _COMPLETE.json last, pipeline.storage.shipping)
        eval.json
        _done/<phase>.json           one completion marker per phase; resume skips marked phases
        _SUCCESS                     the whole round is done
      report.md  rounds.png

Every file is written atomically (``data.atomic_io``); the markers go last, so resume checks only them.
A run directory is a local path, a ``file://`` URI or an object-store URI (``s3://``, ``gs://``): ``RunDir.open``
stages the latter in a local directory that is uploaded as it is written (``pipeline.storage.remote``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic_io import StorageError, atomic_write_json, atomic_write_text, read_json, remove_file, utc_now
from pipeline.storage.remote import WEIGHT_SUFFIXES, ObjectStore, StagedRun, is_remote, local_run_dir
from pipeline.storage.shipping import ship
from pipeline.storage.trees import TreeStore

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.lease import RunLease

PHASES: tuple[str, ...] = ("rollouts", "export", "train_ppm", "train_policy", "eval")
EXPORT_TABLES: tuple[str, ...] = ("sft", "ppm_pairs", "steps", "trees")
_ROUND_RE = re.compile(r"^round_(\d+)$")


class RunDir:
    """Paths and completion markers of one run directory. Creating the object touches nothing on disk."""

    def __init__(self, root: str | Path, remote: StagedRun | None = None):
        self.root = Path(root)
        self.remote = remote  # set when root is the staging copy of a run on object storage
        self.lease: RunLease | None = None  # set by acquire_lease

    @staticmethod
    def open(run_dir: str | Path) -> RunDir:
        """A run directory by path or URI. An object-store URI gets a fresh, empty local staging directory: nothing
        is downloaded before ``acquire_lease`` (a driver) or ``pull`` (a reader)."""
        if is_remote(run_dir):
            staged = StagedRun(str(run_dir))
            return RunDir(staged.local, remote=staged)
        return RunDir(local_run_dir(run_dir))

    @property
    def location(self) -> str:
        """Where the run lives, for people: the URI on object storage, else the path."""
        return self.remote.uri if self.remote else str(self.root)

    def acquire_lease(self, force: bool = False, timeout_s: float | None = None) -> RunLease:
        """Take the run lease (``pipeline.lease``): one driver per run. Raises LeaseHeld naming the holder.

        On object storage the lease is an object of the run; once held, the run is downloaded into the staging
        directory and every later atomic write is uploaded; releasing the lease uploads the log and removes the
        staging directory."""
        from pipeline.lease import DEFAULT_TIMEOUT_S, RunLease

        file = self.remote.lease_file() if self.remote else None
        lease = RunLease(self.root, timeout_s or DEFAULT_TIMEOUT_S, file=file, name=self.location)
        try:
            lease.acquire(force)
            if self.remote:
                try:
                    self.remote.pull()
                except BaseException:
                    lease.release()
                    raise
        except BaseException:
            if self.remote:
                self.remote.close()  # nothing of the run was changed; the staging directory goes
            raise
        if self.remote:
            self.remote.start_publishing()
            lease.on_release.append(self.remote.close)
            lease.on_heartbeat.append(self.remote.upload_log_on_heartbeat)
        self.lease = lease
        return lease

    def pull(self, weights: bool = True) -> None:
        """Download a run on object storage into the staging directory without taking the lease (readers:
        ``info``); ``weights`` False skips checkpoint weight files. Nothing to do for a local run."""
        if self.remote:
            self.remote.pull(None if weights else lambda rel: rel.endswith(WEIGHT_SUFFIXES))

    def close(self) -> None:
        """Release the lease if held (uploading what is left), and drop a staging directory."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.remote:
            self.remote.close()

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def ship(self, fn: Callable[..., Any], *args: Any, writes: Path | None = None, **kwargs: Any) -> Callable[[], Any]:
        """``fn`` bound to its arguments, to be called in another process, maybe on another node (a Ray task, an
        actor's model factory). On object storage every argument that is a path of the run is named by the run
        (``pipeline.storage.shipping``): inputs are uploaded now and downloaded there; ``writes``, the output
        directory, is uploaded there when ``fn`` returns; then call ``fetch(writes)`` here. On a local run
        this is ``functools.partial(fn, *args, **kwargs)``."""
        if self.remote is None:
            return functools.partial(fn, *args, **kwargs)
        return ship(self.remote, fn, args, kwargs, writes)

    def fetch(self, path: Path) -> None:
        """After a shipped call that wrote ``path`` returned: its files in the staging copy, weights excepted
        (``StagedRun.fetch``), so the rest of the round sees the checkpoint. Nothing to do on a local run."""
        if self.remote:
            self.remote.fetch(Path(path).resolve().relative_to(self.root.resolve()).as_posix())

    @staticmethod
    def fresh(runs_dir: str | Path, name: str, now: _dt.datetime | None = None) -> RunDir:
        """Create ``runs_dir/<name>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... if taken) and return it.

        ``runs_dir`` may be an object-store URI: the first such name without a ``config.yaml`` there is opened
        (staged, nothing written yet); the run lease, taken next, keeps a second driver out."""
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        if is_remote(runs_dir):
            for i in range(1, 1000):
                uri = f"{str(runs_dir).rstrip('/')}/{name}-{stamp}" + ("" if i == 1 else f"-{i}")
                if ObjectStore(uri).read_bytes("config.yaml") is None:
                    return RunDir.open(uri)
            raise StorageError(f"{runs_dir}: 999 runs named {name}-{stamp} already exist there")
        base = Path(runs_dir) / f"{name}-{stamp}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 1000):
            path = base if i == 1 else base.with_name(f"{base.name}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return RunDir(path)
        raise StorageError(f"{base}: 999 runs with this name and timestamp already exist in {runs_dir}")

    # ---- paths

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def plot_path(self) -> Path:
        return self.root / "rounds.png"

    def round_dir(self, round: int) -> Path:
        if not isinstance(round, int) or round < 1:
            raise ValueError(f"round={round!r}: rounds are numbered from 1")
        return self.root / f"round_{round}"

    def trees_dir(self, round: int) -> Path:
        return self.round_dir(round) / "trees"

    def export_path(self, round: int, table: str) -> Path:
        if table not in EXPORT_TABLES:
            raise ValueError(f"table={table!r}: must be one of {', '.join(EXPORT_TABLES)}")
        return self.round_dir(round) / f"{table}.parquet"

    def policy_dir(self, round: int) -> Path:
        return self.round_dir(round) / "policy"

    def ppm_dir(self, round: int) -> Path:
        return self.round_dir(round) / "ppm"

    def eval_path(self, round: int) -> Path:
        return self.round_dir(round) / "eval.json"

    def success_path(self, round: int) -> Path:
        return self.round_dir(round) / "_SUCCESS"

    def marker_path(self, round: int, phase: str) -> Path:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: must be one of {', '.join(PHASES)}")
        return self.round_dir(round) / "_done" / f"{phase}.json"

    # ---- content

    def trees(self, round: int, schema: pa.Schema | None = None, id_column: str | None = None) -> TreeStore:
        return TreeStore(self.trees_dir(round), schema, id_column, lease=self.lease)

    def completed_problem_ids(self, round: int) -> set[str]:
        return self.trees(round).completed_problem_ids()

    def write_config(self, text: str) -> Path:
        """Store the resolved config (YAML text from ``pipeline.config.dump_config``); first thing a run writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.config_path, text)

    def read_config(self) -> str:
        if not self.config_path.is_file():
            raise StorageError(f"{self.config_path}: not found; {self.root} is not a run directory "
                               f"(a run writes its config.yaml first)")
        return self.config_path.read_text()

    def rounds(self) -> list[int]:
        """Round numbers that have a directory, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _ROUND_RE.match(p.name)))

    # ---- completion markers

    def mark_done(self, round: int, phase: str, info: dict | None = None) -> None:
        """Record that ``phase`` of ``round`` is complete; ``info`` (JSON-able) is kept for ``info``/reports."""
        if self.remote:  # what the phase wrote from other processes (a Ray task) goes up before the marker
            out = Path((info or {}).get("out_dir") or self.root)
            if out.is_relative_to(self.root) and not out.exists():
                raise StorageError(f"{self.location}: {phase} of round {round} reports writing {out}, which is not "
                                   f"in this driver's staging copy: the work that wrote it did not go through "
                                   f"RunDir.ship / RunDir.fetch (pipeline.storage.shipping), so its output never "
                                   f"reached the store. The phase is not marked done; rerun it once that is fixed.")
            self.remote.sync_up(self.round_dir(round).relative_to(self.root).as_posix())
        atomic_write_json(self.marker_path(round, phase), {"phase": phase, "round": round,
                                                            "done_at": utc_now(), "info": info or {}})
        if self.remote:  # the log is appended, not written atomically: publish it at each phase boundary
            self.remote.upload_log()

    def is_done(self, round: int, phase: str) -> bool:
        return self.marker_path(round, phase).is_file()

    def marker(self, round: int, phase: str) -> dict | None:
        path = self.marker_path(round, phase)
        return read_json(path) if path.is_file() else None

    def phases_done(self, round: int) -> list[str]:
        """Completed phases of ``round`` in pipeline order."""
        return [p for p in PHASES if self.is_done(round, p)]

    def clear_done(self, round: int, phase: str) -> None:
        """Forget a phase's completion (to force it to run again); absent markers are fine."""
        remove_file(self.marker_path(round, phase))

    def clear_round_success(self, round: int) -> None:
        remove_file(self.success_path(round))

    def mark_round_success(self, round: int, info: dict | None = None) -> None:
        atomic_write_json(self.success_path(round), {"round": round, "done_at": utc_now(), "info": info or {}})

    def round_succeeded(self, round: int) -> bool:
        return self.success_path(round).is_file()

    def write_eval(self, round: int, results: dict) -> Path:
        return atomic_write_json(self.eval_path(round), results)

    def read_eval(self, round: int) -> dict | None:
        path = self.eval_path(round)
        return read_json(path) if path.is_file() else None


@contextlib.contextmanager
def stored_config(run_dir: str | Path) -> Iterator[Path]:
    """The run's ``config.yaml`` as a local file, without taking the lease (downloaded to a temporary file on
    object storage); the path does not exist when the run has no config."""
    if not is_remote(run_dir):
        yield local_run_dir(run_dir) / "config.yaml"
        return
    data = ObjectStore(str(run_dir)).read_bytes("config.yaml")
    with tempfile.TemporaryDirectory(prefix="open-rstar-config-") as tmp:
        path = Path(tmp) / "config.yaml"
        if data is not None:
            path.write_bytes(data)
        yield path


@contextlib.contextmanager
def opened_run(run_dir: str | Path, lease: bool = True, force: bool = False) -> Iterator[RunDir]:
    """A run directory for a command that reads or changes it (export, eval, info).

    ``lease`` True takes the run lease for the duration (a running driver makes the command fail with its name);
    False only reads: an object-store run is downloaded without checkpoint weights."""
    run = RunDir.open(run_dir)
    try:
        if lease:
            run.acquire_lease(force)
        else:
            run.pull(weights=False)
        yield run
    finally:
        run.close()


__all__ = ["PHASES", "EXPORT_TABLES", "RunDir", "opened_run", "stored_config"]
