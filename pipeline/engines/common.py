"""Small pieces every policy backend shares: stop strings per mode, cutting at a stop, sample seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from mcts.protocols import Proposal
from mcts.steps import SOLUTION_STOP_STRINGS, STOP_STRINGS

MODES = ("step", "solution")


class EngineError(RuntimeError):
    """A backend failed in a way the caller cannot fix by retrying; the message says where and what to do."""


def import_vllm():
    """The ``vllm`` module, or an EngineError saying how to get it (it is an optional, GPU-side dependency)."""
    try:
        import vllm
    except ImportError as e:
        raise EngineError(f"this engine backend needs vLLM, which is not importable here ({e}); on a GPU machine "
                          f"install it with: pip install 'open-rstar[vllm]'; for CPU see scripts/vllm_cpu_check.py; "
                          f"or set engines.backend: transformers") from e
    return vllm


def stop_strings(mode: str) -> tuple[str, ...]:
    """'step' stops at either delimiter; 'solution' lets the model write many steps and stops at the answer.
    Both stop where the model starts writing an '# output:' line itself (mcts.steps explains why)."""
    if mode == "step":
        return STOP_STRINGS
    if mode == "solution":
        return SOLUTION_STOP_STRINGS
    raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")


def cut_at_stop(text: str, stops: tuple[str, ...]) -> Proposal:
    """The text before the earliest stop string, and which one it was (None: no stop string in text)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return Proposal(text=text, stop=None)
    return Proposal(text=text[: best[0]], stop=best[1])


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``prompts`` (token ids) in lexicographic order: prompts sharing a prefix (one tree's siblings,
    one question's nodes, the instruction everyone shares) become neighbours, so a prefix cache that fills in
    arrival order (vLLM's automatic prefix caching) computes each shared prefix once, for its first prompt."""
    return sorted(range(len(prompts)), key=lambda i: list(prompts[i]))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request with ``seed``: independent streams, stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
