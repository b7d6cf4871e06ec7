"""Derived seeds: every random choice in a run traces back to (run seed, round, problem id, ...).

Python's ``hash()`` of a str is salted per process, so it cannot be used; sha256 over a canonical
encoding of the parts is stable across processes, machines and Python versions. A rerun with the same
run seed therefore reproduces each tree exactly, whichever worker and in whichever order it runs.
"""

from __future__ import annotations

import hashlib

_MASK = (1 << 63) - 1  # non-negative and fits a signed int64 (numpy / torch / vLLM seeds)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``; ints and strs are tagged so ``1`` and ``"1"`` give different seeds."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed part {part!r}: must be an int or a str")
        tag = b"i" if isinstance(part, int) else b"s"
        data = str(part).encode("utf-8")
        # Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update(tag + len(data).to_bytes(4, "little") + data)
    return int.from_bytes(h.digest()[:8], "little") & _MASK


def tree_seed(run_seed: int, round_index: int, problem_id: str) -> int:
    """The seed of one problem's tree in one round (its tie-breaking RNG and all its sampling seeds)."""
    return derive_seed("tree", run_seed, round_index, str(problem_id))


def escalation_seed(run_seed: int, round_index: int, problem_id: str, stage: int) -> int:
    """The seed of the fresh tree an unsolved problem gets at escalation ``stage`` (1-based; round 4)."""
    return derive_seed("unsolved", run_seed, round_index, str(problem_id), stage)


def proposal_seed(tree: int, node_id: int, attempt: int) -> int:
    """Sampling seed for expanding node ``node_id`` (``attempt`` counts earlier failed expansions of it)."""
    return derive_seed("propose", tree, node_id, attempt)
