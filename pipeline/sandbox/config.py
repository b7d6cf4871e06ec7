"""Sandbox settings: every tunable number of ``pipeline.sandbox`` in one frozen dataclass.

The pipeline composes ``SandboxConfig`` into the run config (``sandbox:`` in YAML). Messages name the field
without the section prefix ("workers=0: must be >= 1"); the config loader adds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Imported once in each warm worker (the zygote) before any step runs; a missing one is skipped, so the
# list can name optional packages. Steps still write their own imports: these only make them free.
DEFAULT_WARM_MODULES: tuple[str, ...] = ("math", "fractions", "random", "itertools", "sympy", "numpy")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and sizes of one ``SandboxPool``. Units are in the field names."""

    workers: int = 2  # steps executing at once; one per core is right, more only adds wall-clock timeouts
    timeout: float = 5.0  # wall seconds per step; a rebuild on a miss gets this per replayed step too
    memory_mb: int = 2048  # RLIMIT_AS of every sandbox process (virtual memory, so keep room above RSS)
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file a step may write in its scratch directory
    stdout_bytes: int = 4096  # kept per stream (stdout, stderr); the rest is cut with a marker
    output_limit_bytes: int = 1 << 20  # a step writing more than this is stopped with an OutputLimit error
    # Interpreter states kept for future children (LRU). Each is an idle process of ~5 MB private memory
    # (the rest is shared copy-on-write with the warm worker), so 128 states cost ~0.6 GB.
    max_live_states: int = 128
    max_code_bytes: int = 128 * 1024  # one request's code plus history, as sent to a worker
    # When the pool runs as root, the host user sandbox processes run as: under kernel isolation their uid
    # 1000 inside the user namespace maps to it; under process isolation they switch to it (skipped, with a
    # warning, if it cannot read the interpreter). Ignored when not root. None keeps root: not advised.
    user: str | None = "nobody"
    # "kernel": every cell of sandbox processes gets user, PID, mount and network namespaces, a read-only
    # root, seccomp and Landlock (see isolation.py); the pool refuses to start if the kernel lacks one.
    # "process": rlimits and the in-process guard only, not a security boundary; logged loudly once.
    isolation: str = "kernel"
    scratch_mb: int = 64  # size of each cell's private tmpfs on /tmp (kernel isolation); counts as memory
    # Pool-wide cap on the proportional memory (PSS) of kept states; the least recently used are evicted
    # above it. 0: no cap beyond max_live_states.
    memory_budget_mb: int = 8192
    warm_modules: tuple[str, ...] = DEFAULT_WARM_MODULES
    startup_timeout: float = 120.0  # seconds for a warm worker to import its modules and report ready

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1")
        if not (self.timeout > 0) or math.isinf(self.timeout):
            raise ValueError(f"timeout={self.timeout}: must be a positive finite number of seconds")
        if self.memory_mb < 256:
            raise ValueError(f"memory_mb={self.memory_mb}: must be >= 256 (the warm interpreter alone needs ~200)")
        if self.file_size_mb < 1:
            raise ValueError(f"file_size_mb={self.file_size_mb}: must be >= 1")
        if self.stdout_bytes < 64:
            raise ValueError(f"stdout_bytes={self.stdout_bytes}: must be >= 64")
        if self.output_limit_bytes < self.stdout_bytes:
            raise ValueError(
                f"output_limit_bytes={self.output_limit_bytes}: must be >= stdout_bytes ({self.stdout_bytes})"
            )
        if self.max_live_states < 0:
            raise ValueError(f"max_live_states={self.max_live_states}: must be >= 0 (0 = always replay)")
        if not (1024 <= self.max_code_bytes <= 1 << 20):
            raise ValueError(
                f"max_code_bytes={self.max_code_bytes}: must be in [1024, 1048576] (one socket message carries it)"
            )
        if self.user is not None and not self.user.strip():
            raise ValueError(f"user={self.user!r}: must be a user name, or None to keep running as root")
        if self.isolation not in ("kernel", "process"):
            raise ValueError(f"isolation={self.isolation!r}: must be 'kernel' or 'process'")
        if self.scratch_mb < 1:
            raise ValueError(f"scratch_mb={self.scratch_mb}: must be >= 1")
        if self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb={self.memory_budget_mb}: must be >= 0 (0 = no budget)")
        if not all(isinstance(m, str) and m.strip() for m in self.warm_modules):
            raise ValueError(f"warm_modules={self.warm_modules!r}: must be module names")
        if not (self.startup_timeout > 0):
            raise ValueError(f"startup_timeout={self.startup_timeout}: must be > 0 seconds")
