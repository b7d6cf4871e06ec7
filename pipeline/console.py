"""What a person sees while a run works: one live progress display per phase, one summary line per phase.

    console = Console()                        # stdout; a terminal gets tqdm bars, anything else plain lines
    with console.quiet_libraries(run.root / "libraries.log"):
        bar = console.bar("round 1 rollouts", total=40)
        bar.update(solved=1, tokens=812)       # one problem done
        bar.close("40/40 problems, 12 solved")

On a terminal each phase is one tqdm bar (``round 1 rollouts  12/40 [01:10<02:20, solved=5, tok/s=41]``: done /
total, elapsed < ETA); training shows steps and the last loss, evaluation one bar per strategy. When stdout is
not a terminal (CI, ``ray job logs``) a bar is a plain line at most every ``interval_s`` seconds, with the same
numbers. Either way a bar ends in one summary line, and warnings and errors of the run log are lines of their own.

Everything else goes to the run's log files, not the console: ``log.jsonl`` keeps every event (``RunLog``), and
``quiet_libraries`` sends what libraries print (``FutureWarning``s, transformers' and datasets' "Loading
weights" bars, the trainer's ``{'loss': ...}`` dicts, actor output that Ray forwards) to ``libraries.log``.
``verbose`` shows it all on the console again, every run-log event included.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

# Libraries whose Python logging goes to libraries.log (their warnings and info lines) unless verbose.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "trl", "accelerate", "torch", "ray", "filelock",
                   "urllib3", "gguf")


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Bar:
    """One phase's live progress: counts done of ``total``, solved, tokens, the last loss. ``update`` is cheap:
    the terminal bar redraws (tqdm limits the rate), a plain line is printed at most every ``interval_s``."""

    def __init__(self, console: Console, label: str, total: int | None, unit: str, solved: bool = False):
        self.console = console
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.solved: int | None = 0 if solved else None  # None: not shown until something is solved
        self.tokens = 0
        self.loss: float | None = None
        self.start = console.clock()
        self._last_line = self.start
        self._closed = False
        self._tqdm = None
        if console.interactive:
            from tqdm import tqdm

            # A terminal that reports no size (a pty nobody sized, e.g. under `script` or a test) gets COLUMNS or
            # 100 columns: tqdm would draw nothing in a 0x0 terminal.
            width = _terminal_width(console.stream)
            size = {} if width is None else {"ncols": width, "nrows": 24}  # tqdm hides bars past nrows (0 here)
            self._tqdm = tqdm(total=total, desc=label, unit=unit, file=console.stream, dynamic_ncols=width is None,
                              leave=False, mininterval=console.min_redraw_s, miniters=1, **size)

    def update(self, n: int = 1, *, solved: int = 0, tokens: int = 0, loss: float | None = None) -> None:
        """``n`` more done; ``solved`` of them solved; ``tokens`` generated; ``loss`` the latest training loss."""
        self.done += n
        if solved or self.solved is not None:
            self.solved = (self.solved or 0) + solved
        self.tokens += tokens
        if loss is not None:
            self.loss = loss
        self._show(n)

    def set_tokens(self, total: int) -> None:
        """The token total from a source that counts in one place (the engines); shown as a rate."""
        self.tokens = total
        self._show(0)

    def tick(self) -> None:
        """Nothing new, time passed: refresh elapsed time and ETA (a plain line if ``interval_s`` passed)."""
        self._show(0)

    def stats(self) -> list[str]:
        """The numbers after done/total, e.g. ['5 solved', '41 tok/s'] (only those something reported)."""
        elapsed = max(self.console.clock() - self.start, 1e-9)
        out = []
        if self.solved is not None:
            out.append(f"{self.solved} solved")
        if self.tokens:
            out.append(f"{self.tokens / elapsed:.0f} tok/s")
        if self.loss is not None:
            out.append(f"loss {self.loss:.4g}")
        return out

    def _show(self, n: int) -> None:
        if self._closed:
            return
        if self._tqdm is not None:
            postfix = ", ".join(self.stats())
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(n) if n else self._tqdm.refresh()
            return
        now = self.console.clock()
        if now - self._last_line >= self.console.interval_s:
            self._last_line = now
            self.console.line(self.progress_line())

    def progress_line(self) -> str:
        """The plain-mode line: label, done/total unit, stats, elapsed and ETA."""
        elapsed = self.console.clock() - self.start
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.label}: {self.done}{total} {self.unit}s", *self.stats(), f"{duration(elapsed)} elapsed"]
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {duration(elapsed / self.done * (self.total - self.done))}")
        return ", ".join(parts)

    def set_total(self, total: int | None, done: int = 0) -> None:
        """Known only once work starts (a trainer's max steps; ``done`` steps already taken on a resume)."""
        self.total, self.done = total, done
        if self._tqdm is not None:
            self._tqdm.reset(total=total)
            self._tqdm.update(done)

    def close(self, summary: str | None = None, line: bool = True) -> None:
        """End the bar with one line: ``label done in 1m02s: summary`` (default summary: done/total and stats);
        ``line`` False: no line (the phase's own summary line follows)."""
        if self._closed:
            return
        self._closed = True
        self.console._closed(self)
        if self._tqdm is not None:
            self._tqdm.close()
        if not line:
            return
        elapsed = self.console.clock() - self.start
        if summary is None:
            total = f"/{self.total}" if self.total is not None else ""
            summary = ", ".join([f"{self.done}{total} {self.unit}s", *self.stats()])
        self.console.line(f"{self.label} done in {duration(elapsed)}: {summary}")


class Console:
    """The run's console (see the module doc). ``interactive`` None: a tqdm bar when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None, verbose: bool = False,
                 interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 timestamps: Callable[[], str] | None = None, min_redraw_s: float = 0.2,
                 tick_s: float | None = 1.0):
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self.verbose = verbose
        self.interval_s = interval_s  # plain mode: seconds between a bar's lines
        self.min_redraw_s = min_redraw_s  # terminal mode: tqdm's least time between redraws
        # While a bar is open a daemon thread ticks it every tick_s seconds, so a phase whose next problem takes
        # minutes still shows time passing (and a plain line every interval_s). None: no thread (tests).
        self.tick_s = tick_s
        self.clock = clock
        self._open: list[Bar] = []
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stamp = timestamps or (lambda: time.strftime("%H:%M:%S"))

    def line(self, text: str, stamp: bool = True) -> None:
        """One line above any live bar (plain mode: with a clock time in front unless ``stamp`` is False)."""
        if self.interactive:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(f"{self._stamp()} {text}" if stamp else text, file=self.stream, flush=True)

    def bar(self, label: str, total: int | None, unit: str = "problem", solved: bool = False) -> Bar:
        """A live bar for one phase; ``solved`` True shows the solved count from the start (0 included)."""
        bar = Bar(self, label, total, unit, solved)
        if self.tick_s is not None:
            with self._lock:
                self._open.append(bar)
                if self._ticker is None or not self._ticker.is_alive():
                    self._ticker = threading.Thread(target=self._tick_open_bars, name="console-ticker", daemon=True)
                    self._ticker.start()
        return bar

    def _closed(self, bar: Bar) -> None:
        with self._lock:
            if bar in self._open:
                self._open.remove(bar)

    def _tick_open_bars(self) -> None:
        """The ticker thread: ends once no bar is open (a later bar starts a new one)."""
        assert self.tick_s is not None
        while True:
            time.sleep(self.tick_s)
            with self._lock:
                bars = list(self._open)
                if not bars:
                    self._ticker = None
                    return
            for bar in bars:
                bar.tick()

    @contextlib.contextmanager
    def quiet_libraries(self, path: Path) -> Iterator[None]:
        """Inside: what libraries print goes to ``path`` (appended), not the console; nothing changes when
        verbose. Python's ``sys.stdout`` / ``sys.stderr``, warnings and the libraries' loggers are swapped for
        the file, and the Hugging Face progress bars are switched off; all is put back on exit (also on an
        error, so its traceback reaches the real stderr)."""
        if self.verbose:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", buffering=1, encoding="utf-8") as sink:
            handler = logging.StreamHandler(sink)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            saved_loggers = []
            for name in LIBRARY_LOGGERS:
                lg = logging.getLogger(name)
                saved_loggers.append((lg, lg.handlers[:], lg.propagate))
                lg.handlers = [handler]
                lg.propagate = False
            bars = _hf_progress_bars(enabled=False)
            saved_show = warnings.showwarning

            def to_file(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                        line: str | None = None) -> None:
                sink.write(warnings.formatwarning(message, category, filename, lineno, line))

            warnings.showwarning = to_file
            try:
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    yield
            finally:
                warnings.showwarning = saved_show
                _hf_progress_bars(enabled=True, only=bars)
                for lg, handlers, propagate in saved_loggers:
                    lg.handlers, lg.propagate = handlers, propagate


def _terminal_width(stream: TextIO) -> int | None:
    """None when ``stream`` is a terminal that knows its width (tqdm follows it), else the width to draw at."""
    import os
    import shutil

    try:
        if os.get_terminal_size(stream.fileno()).columns > 0:
            return None
    except (AttributeError, ValueError, OSError):  # not a real file (StringIO) or not a terminal
        pass
    return int(os.environ.get("COLUMNS") or 0) or shutil.get_terminal_size((100, 24)).columns or 100


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _hf_progress_bars(enabled: bool, only: list[str] | None = None) -> list[str]:
    """Switch the progress bars of the Hugging Face libraries that are imported; returns the ones switched."""
    switched = []
    for name, module, off, on in (
        ("transformers", "transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
        ("datasets", "datasets.utils.logging", "disable_progress_bar", "enable_progress_bar"),
        ("huggingface_hub", "huggingface_hub.utils", "disable_progress_bars", "enable_progress_bars"),
    ):
        if only is not None and name not in only:
            continue
        try:
            mod = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        getattr(mod, on if enabled else off)()
        switched.append(name)
    return switched


def phase_summary(phase: str, info: dict[str, Any]) -> str:
    """The one line that ends a phase, from the info its marker records (``pipeline.driver.PHASES``)."""
    if isinstance(info.get("skipped"), str):  # the phase did nothing (eval's dict names skipped metrics)
        return f"skipped ({info['skipped']})"
    if phase == "rollouts":
        stats = info.get("stats") or {}
        tok = f", {stats['tokens'] / stats['wall_s']:.0f} tok/s" if stats.get("tokens") and stats.get("wall_s") else ""
        return f"{info.get('stored', 0)} trees stored, {info.get('solved', 0)} solved{tok}"
    if phase == "export":
        return ", ".join(f"{k} {v} rows" for k, v in (info.get("rows") or {}).items())
    if phase in ("train_policy", "train_ppm"):
        acc = info.get("pairwise_accuracy")
        held = f", held-out pair accuracy {acc:.2f} ({info['heldout_pairs']} pairs)" if info.get("heldout_pairs") else ""
        return f"{info.get('steps', 0)} steps, final loss {info.get('final_loss', float('nan')):.4g}{held}"
    if phase == "eval":
        if "same_as_round" in info:
            return f"same models as round {info['same_as_round']}: its numbers stand"
        shown = {"greedy_pass1": "greedy", "maj_at_k": "maj@k", "ppm_best_of_n": "PPM best-of-N",
                 "ppm_mcts": "PPM MCTS", "train_solved": "train solved"}
        metrics = info.get("metrics") or {}
        return ", ".join(f"{name} {metrics[k]:.1%}" for k, name in shown.items() if metrics.get(k) is not None)
    return ""


__all__ = ["Console", "Bar", "phase_summary", "duration", "LIBRARY_LOGGERS"]
