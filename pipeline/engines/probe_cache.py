"""Where ``cpu_fast_path: auto`` remembers its decision: one small JSON per machine, keyed by what decides it.

A timing probe on a shared machine can pick differently from one start to the next, and a resumed run would
then decode with other numbers than the run it resumes. So the first probe's pick is stored, and every later
engine start with the same key takes it without timing anything:

    key = CPU model + CPU flags + torch version + model identity (its architecture, not its weights)
          + torch threads + batch rows + the probe prompt

    $OPEN_RSTAR_CACHE_DIR/cpu_fast_path.json        (default $XDG_CACHE_HOME/open-rstar, else ~/.cache/open-rstar)
    {"version": 1, "entries": {"<key hash>": {"chosen": "bf16", "tok_per_s": {...}, "agrees": {...},
                                              "key": {...}, "probed_at": "2026-12-01T10:40:00Z",
                                              "checked": {"<weights id>": {"bf16": true}}}}}

The key names the architecture, not the weights, so the pick's greedy check is redone for each checkpoint a
cached pick is used on (``fastpath.choose``) and its result kept under ``checked`` (the newest ``_CHECKED_KEPT``
checkpoints, by ``weights_id``: file names, sizes and modification times).

``OPEN_RSTAR_REPROBE=1`` probes again and replaces the entry (after a CPU or load change one wants measured).
Engines starting together on one machine take a file lock around lookup, probe and write, so they neither
time each other nor store two different picks. The file is written to a temp name and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.atomic_io import file_lock

CACHE_ENV = "OPEN_RSTAR_CACHE_DIR"
REPROBE_ENV = "OPEN_RSTAR_REPROBE"
CACHE_FILE = "cpu_fast_path.json"
_VERSION = 1
_CHECKED_KEPT = 32  # checkpoints whose greedy checks an entry remembers
_WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def cache_dir() -> Path:
    """$OPEN_RSTAR_CACHE_DIR, else $XDG_CACHE_HOME/open-rstar, else ~/.cache/open-rstar."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "open-rstar"


def reprobe_requested() -> bool:
    return os.environ.get(REPROBE_ENV, "").strip().lower() in ("1", "true", "yes")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


_ARCHITECTURE = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def model_identity(model) -> dict[str, Any]:
    """The model's architecture: what decides the paths' speed. Not its weights: every round trains a new
    checkpoint of one architecture, and probing each again (int8 quantization alone takes ~6 s on the 135M
    model) would cost every round; the greedy check is made on the first checkpoint of an architecture probed."""
    cfg = model.config
    return {name: getattr(cfg, name, None) for name in _ARCHITECTURE}


def weights_id(model_path: str | os.PathLike) -> str:
    """Which weights a checkpoint holds, cheaply: a hash of its weight files' names, sizes and modification times
    (a directory), or of the path itself (a hub name or a single file). A rewritten checkpoint gets a new id."""
    path = Path(model_path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(_WEIGHT_FILES)) if path.is_dir() \
        else [path] if path.is_file() else []
    parts = [str(path.resolve()) if files else str(model_path)]
    parts += [f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
              for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def machine_key(model, threads: int, rows: int, prompt_ids: Sequence[int], flags: frozenset[str]) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "torch": torch.__version__, "model": model_identity(model), "threads": threads, "rows": rows,
            "prompt": hashlib.sha256(json.dumps(list(prompt_ids)).encode()).hexdigest()[:16]}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class ProbeCache:
    """The cache file of one directory. ``lookup``/``store`` are meant to run inside ``locked()``."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.path = self.dir / CACHE_FILE

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock on ``cpu_fast_path.lock`` beside the file (released when the process dies)."""
        return file_lock(self.dir / "cpu_fast_path.lock")

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every stored decision; {} when there is no file. A file that is not this format raises ValueError."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"{self.path}: not a version-{_VERSION} fast-path cache")
        return data["entries"]

    def lookup(self, key: dict[str, Any]) -> dict[str, Any] | None:
        return self.entries().get(key_hash(key))

    def record_check(self, key: dict[str, Any], weights: str, agrees: dict[str, bool]) -> None:
        """Keep ``agrees`` (path: greedy text equals fp32's) for the checkpoint ``weights`` in ``key``'s entry."""
        entries = self.entries()
        entry = entries.get(key_hash(key))
        if entry is None:
            return
        checked = {k: v for k, v in entry.get("checked", {}).items() if k != weights}
        checked[weights] = agrees
        entry["checked"] = dict(list(checked.items())[-_CHECKED_KEPT:])
        self._write(entries)

    def store(self, key: dict[str, Any], record: dict[str, Any]) -> None:
        """Add (or replace) the decision for ``key``; an unreadable old file is replaced, not merged."""
        try:
            entries = self.entries()
        except ValueError:
            entries = {}
        entries[key_hash(key)] = {**record, "key": key,
                                  "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._write(entries)

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _VERSION, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
