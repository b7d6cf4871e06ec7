"""The run's structured log and live progress counters.

Every event is one JSON line in ``runs/NAME/log.jsonl``::

    {"ts": "2026-11-23T10:50:01.123+00:00", "level": "info", "event": "rollouts.progress", "round": 1, ...}

and one human-readable line on the console (stderr)::

    10:50:01 info  rollouts.progress round=1 problems=12/40 solve_rate=0.42 rollouts_per_s=3.1

Lines are appended with a single ``write`` on an ``O_APPEND`` descriptor, so several processes of one run
(driver, resume) may share the file, and a killed process leaves at most its last line cut short
(``read_log`` skips such a line). ``Progress`` shows a tqdm bar when stderr is a terminal and otherwise
logs a ``<name>.progress`` event every ``interval_s`` seconds: Ray job logs are not a terminal. A run's log has a
``pipeline.console.Console``: then the console prints (warnings and errors, or every event when verbose), a
progress draws the console's bar, and ``<name>.progress`` events go to the file every ``interval_s`` seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class RunLogConfig:
    console: bool = True  # also print each event as one line on stderr
    console_level: str = "info"  # the least severe level printed on the console; the file gets every level
    progress_interval_s: float = 30.0  # seconds between progress log lines when stderr is not a terminal

    def __post_init__(self) -> None:
        if self.console_level not in LEVELS:
            raise ValueError(f"console_level={self.console_level!r}: must be one of {', '.join(LEVELS)}")
        if not self.progress_interval_s > 0:
            raise ValueError(f"progress_interval_s={self.progress_interval_s}: must be > 0")


def _json_default(obj: Any) -> Any:
    # Paths, sets and numpy scalars show up in fields; log them rather than fail the run over a log line.
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "item"):
        return obj.item()
    return repr(obj)


def _console_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = v if isinstance(v, str) else json.dumps(v, default=_json_default)
    return s if len(s) <= 120 else s[:117] + "..."


class RunLog:
    """Append structured events to a JSON-lines file (and the console)."""

    def __init__(self, path: str | Path | None, config: RunLogConfig = RunLogConfig(),
                 stream: TextIO | None = None, clock: Callable[[], float] = time.time, console: Any = None):
        self.path = Path(path) if path is not None else None
        self.config = config
        # A ``pipeline.console.Console``: then it alone prints, warnings and errors only (every event if verbose),
        # and ``progress`` draws its live bar; without one, events print to ``stream`` as lines.
        self.console = console
        self._stream = stream
        self._clock = clock
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def log(self, level: str, event: str, /, **fields: Any) -> dict:
        """Write one event; returns the record as written. ``ts``/``level``/``event`` may not be fields."""
        if level not in LEVELS:
            raise ValueError(f"level={level!r}: must be one of {', '.join(LEVELS)}")
        clash = {"ts", "level", "event"} & fields.keys()
        if clash:
            raise ValueError(f"log field(s) {sorted(clash)}: reserved names; rename them")
        now = self._clock()
        ts = _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat(timespec="milliseconds")
        record = {"ts": ts, "level": level, "event": event, **fields}
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record, default=_json_default) + "\n").encode("utf-8"))
        floor = "info" if self.console is None or self.console.verbose else "warning"
        floor = max(floor, self.config.console_level, key=LEVELS.index)
        if self.config.console and LEVELS.index(level) >= LEVELS.index(floor):
            clock = _dt.datetime.fromtimestamp(now).strftime("%H:%M:%S")
            kv = " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
            text = f"{clock} {level:<7} {event} {kv}".rstrip()
            if self.console is not None:
                self.console.line(text, stamp=False)
            else:
                print(text, file=self.stream, flush=True)
        return record

    def debug(self, event: str, /, **fields: Any) -> dict:
        return self.log("debug", event, **fields)

    def info(self, event: str, /, **fields: Any) -> dict:
        return self.log("info", event, **fields)

    def warning(self, event: str, /, **fields: Any) -> dict:
        return self.log("warning", event, **fields)

    def error(self, event: str, /, **fields: Any) -> dict:
        return self.log("error", event, **fields)

    def progress(self, name: str, total: int | None = None, **context: Any) -> Progress:
        """Live counters for a long phase; ``context`` (e.g. round=2) is added to every progress event."""
        return Progress(self, name, total, context)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path, last: int | None = None, min_level: str = "debug") -> list[dict]:
    """Events from a log file, oldest first; ``last`` keeps only the final N at ``min_level`` or above.

    With ``last`` the file is read backwards block by block, so ``info`` on a long run stays instant. A line
    that is not JSON (a writer killed mid-line) is skipped; everything else is returned as written.
    """
    path = Path(path)
    if not path.is_file():
        return []
    floor = LEVELS.index(min_level)
    lines = reversed(path.read_bytes().splitlines()) if last is None else _lines_backwards(path)
    out: list[dict] = []
    for raw in lines:
        if last is not None and len(out) >= last:
            break
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        level = rec.get("level") if isinstance(rec, dict) else None
        if level in LEVELS and LEVELS.index(level) >= floor:
            out.append(rec)
    return out[::-1]


def _lines_backwards(path: Path, block: int = 1 << 16) -> Iterator[bytes]:
    """The file's lines, last first, reading ``block`` bytes at a time from the end."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""  # the start of a line whose beginning lies in an earlier block
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + rest).split(b"\n")
            rest = parts[0]
            yield from (ln for ln in reversed(parts[1:]) if ln)
        if rest:
            yield rest


def format_event(rec: dict) -> str:
    """One log record as the console shows it (used by ``info`` for the last lines)."""
    ts = str(rec.get("ts", ""))
    clock = ts[11:19] if len(ts) >= 19 else ts
    fields = {k: v for k, v in rec.items() if k not in ("ts", "level", "event")}
    kv = " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
    return f"{clock} {rec.get('level', '?'):<7} {rec.get('event', '?')} {kv}".rstrip()


class Progress:
    """Counters of a long phase: problems done / total, rollouts/s, tokens/s, solve rate.

    Token counts appear only once some are counted (``update(tokens=...)`` or ``set_tokens``): a phase whose
    items do not carry them shows no token rate rather than a false zero.

    ``update`` is cheap: it adds to counters and redraws the tqdm bar (terminal) or, at most every
    ``interval_s``, writes a progress event (no terminal). ``close`` always writes a final summary event.
    """

    def __init__(self, log: RunLog, name: str, total: int | None, context: dict[str, Any],
                 clock: Callable[[], float] = time.monotonic, use_tqdm: bool | None = None):
        self.log = log
        self.name = name
        self.total = total
        self.context = context
        self._clock = clock
        self.start = clock()
        self._last_emit = self.start
        self.problems = 0
        self.solved = 0
        self.rollouts = 0
        self.tokens = 0
        self._closed = False
        self._live = None  # the console's bar (pipeline.console.Bar) when the log has a console
        if log.console is not None and log.config.console:
            label = f"round {context['round']} {name}" if "round" in context else name
            self._live = log.console.bar(label, total, solved=True)
            use_tqdm = False
        if use_tqdm is None:
            use_tqdm = log.config.console and log.stream.isatty()
        self._bar = None
        if use_tqdm:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit="problem", file=log.stream, dynamic_ncols=True)

    def snapshot(self) -> dict[str, Any]:
        """The counters and rates now (rates per second of wall time since the phase started)."""
        elapsed = max(self._clock() - self.start, 1e-9)
        snap: dict[str, Any] = {"problems": self.problems}
        if self.total is not None:
            snap["total"] = self.total
        snap.update(solved=self.solved, solve_rate=round(self.solved / self.problems, 4) if self.problems else 0.0,
                    rollouts=self.rollouts, elapsed_s=round(elapsed, 3), rollouts_per_s=round(self.rollouts / elapsed, 3))
        if self.tokens:
            snap.update(tokens=self.tokens, tokens_per_s=round(self.tokens / elapsed, 3))
        return snap

    def set_tokens(self, total: int) -> None:
        """Set the token total from a source that counts them in one place (e.g. the engines)."""
        self.tokens = total
        if self._live is not None:
            self._live.set_tokens(total)

    def tick(self) -> None:
        """Nothing done, time passed: refresh the live display and write a due progress event."""
        self.update()

    def update(self, problems: int = 0, solved: int = 0, rollouts: int = 0, tokens: int = 0) -> None:
        self.problems += problems
        self.solved += solved
        self.rollouts += rollouts
        self.tokens += tokens
        if self._live is not None:
            if problems or solved or tokens:
                self._live.update(problems, solved=solved, tokens=tokens)
            else:
                self._live.tick()
        if self._bar is not None:
            snap = self.snapshot()
            if problems:
                self._bar.update(problems)
            postfix = {"solve": f"{snap['solve_rate']:.2f}", "rps": f"{snap['rollouts_per_s']:.1f}"}
            if self.tokens:
                postfix["tps"] = f"{snap['tokens_per_s']:.0f}"
            self._bar.set_postfix(postfix, refresh=False)
            return
        if self._clock() - self._last_emit >= self.log.config.progress_interval_s:
            self._last_emit = self._clock()
            self.log.info(f"{self.name}.progress", **self.context, **self.snapshot())

    def close(self) -> dict[str, Any]:
        """Write the final ``<name>.done`` event (once) and return its counters."""
        snap = self.snapshot()
        if not self._closed:
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            if self._live is not None:
                self._live.close(line=False)  # the phase's summary line follows (pipeline.driver.run_round)
            self.log.info(f"{self.name}.done", **self.context, **snap)
        return snap

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RunLog", "RunLogConfig", "Progress", "read_log", "format_event", "LEVELS"]
