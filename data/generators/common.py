"""What the built-in generators share: the difficulty scale and the check of their arguments."""

from __future__ import annotations

MAX_DIFFICULTY = 6  # difficulty runs 1..MAX_DIFFICULTY; None mixes the levels


def check_args(n: int, difficulty: int | None) -> None:
    """Reject an impossible ``n`` or ``difficulty`` before any problem is made."""
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if difficulty is not None and not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty={difficulty}: must be 1..{MAX_DIFFICULTY} or None (a mix)")
