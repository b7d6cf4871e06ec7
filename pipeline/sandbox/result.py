"""The record of one execution, and how a dead process's wait status reads as an error.

``error`` is "Kind: message" (``mcts.protocols.ExecOutcome`` wants a short string); ``error_kind`` is one
of ``ERROR_KINDS`` so callers branch on it instead of parsing text. Kinds are decided where they happen:
by the exception the step raised in the worker, or by the parent (timeout, a process that died), never by
reading the step's output.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

SYNTAX = "syntax"  # the code does not compile
RUNTIME = "runtime"  # an exception escaped the step (type and message in ``error``)
TIMEOUT = "timeout"  # wall-clock (parent) or CPU (rlimit) limit
MEMORY = "memory"  # MemoryError under RLIMIT_AS
OUTPUT = "output"  # wrote more than ``output_limit_bytes``
EXIT = "exit"  # SystemExit (sys.exit, exit, quit)
FORBIDDEN = "forbidden"  # the sandbox refused an operation (fork, socket, write outside scratch, kill, ...)
KILLED = "killed"  # the process died without a result (signal, os._exit)
REPLAY = "replay"  # rebuilding the parent state on a miss failed: history no longer runs the same way
INPUT = "input"  # the request itself is unusable (too large)
INTERNAL = "internal"  # the sandbox could not run the step (no warm worker)
ERROR_KINDS = frozenset({SYNTAX, RUNTIME, TIMEOUT, MEMORY, OUTPUT, EXIT, FORBIDDEN, KILLED, REPLAY, INPUT, INTERNAL})


# Lone surrogates: a Python str may hold them (print(chr(0xD800))), UTF-8 cannot, so Arrow, JSON writers and
# tokenizers downstream raise on them. Each one becomes U+FFFD, the Unicode replacement character.
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD: encodable as strict UTF-8, same length."""
    return _SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one step. ``stdout``/``stderr`` are capped, a cut ends with ``truncation_marker``.

    Every text field is valid UTF-8 once constructed (see ``valid_text``): whatever a step prints, its
    result can be stored, so no step output can fail the worker that stores the tree.
    """

    ok: bool
    error: str | None = None  # None when ok, else "Kind: message", e.g. "ZeroDivisionError: division by zero"
    error_kind: str | None = None  # None when ok, else one of ERROR_KINDS
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0  # wall seconds from dispatch to result, fork and any replay included
    replayed: int = 0  # history steps re-executed to rebuild the parent state (0: forked from a live state)

    def __post_init__(self) -> None:
        for name in ("error", "stdout", "stderr"):
            value = getattr(self, name)
            if isinstance(value, str) and _SURROGATE.search(value):
                object.__setattr__(self, name, valid_text(value))  # frozen: set once, here
        if self.ok != (self.error is None) or self.ok != (self.error_kind is None):
            raise ValueError(f"ExecResult: ok={self.ok} with error={self.error!r}, error_kind={self.error_kind!r}")
        if self.error_kind is not None and self.error_kind not in ERROR_KINDS:
            raise ValueError(f"ExecResult: error_kind={self.error_kind!r}: must be one of {sorted(ERROR_KINDS)}")


def failure(kind: str, error: str, duration: float = 0.0, replayed: int = 0) -> ExecResult:
    return ExecResult(ok=False, error=error, error_kind=kind, duration=duration, replayed=replayed)


def truncation_marker(dropped: int) -> str:
    return f"\n...[truncated {dropped} chars]"


def describe_exit(status: int | None) -> tuple[str, str]:
    """(kind, error) for a process that ended without sending a result; ``status`` as from waitpid."""
    if status is None:
        return KILLED, "Killed: the process ended without a result (exit status not observed)"
    if status & 0x7F:  # WIFSIGNALED: the low 7 bits hold the signal number
        sig = status & 0x7F
        if sig == signal.SIGXCPU:
            return TIMEOUT, "Timeout: CPU time limit (SIGXCPU)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return KILLED, f"Killed: signal {sig} ({name})"
    return KILLED, f"Killed: exited with status {(status >> 8) & 0xFF} without a result"
