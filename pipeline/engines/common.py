"""Small pieces every policy backend shares: stop strings per mode, cutting at a stop, sample seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from mcts.protocols import Proposal
from mcts.steps import SOLUTION_STOP_STRINGS, STOP_STRINGS

MODES = ("step", "solution")


class EngineError(RuntimeError):
    """A backend failed in a way the caller cannot fix by retrying; the message says where and what to do."""


@dataclass
class GenStats:
    """Cumulative work of one policy engine: what the benchmarks and the logs report. The transformers backend
    fills every field; the vLLM backends the calls, token counts and seconds (vLLM keeps its own clocks)."""

    calls: int = 0
    prompt_tokens: int = 0  # prompt tokens of the requests (each distinct prompt once), what a cache could serve
    prefill_tokens: int = 0  # prompt tokens actually run through the model (shared prefix counted once)
    new_tokens: int = 0  # sampled tokens, stop/EOS tokens included
    # Prompt tokens whose KV came from a cache instead of a forward: the transformers backend's shared prefix and
    # prefix store, vLLM's automatic prefix cache (``RequestOutput.num_cached_tokens``).
    reused_tokens: int = 0
    seconds: float = 0.0
    # The running batch's own clock (pipeline.engines.batcher): ticks that decoded rows (new_tokens / decode_ticks
    # = mean rows per decode step) and seconds per part of a tick, which say where a phase's tokens/s goes.
    decode_ticks: int = 0
    prefill_s: float = 0.0  # admitted prompts: store lookups and their stored KV, their forward when nothing else runs
    # (fused admissions) or their forward of its own (engines.fused_admission false)
    join_s: float = 0.0  # storing prompt KV, copying it to sample rows, joining the running batch
    sample_s: float = 0.0  # choosing each row's token
    retire_s: float = 0.0  # stop checks and dropping finished rows from the cache
    decode_s: float = 0.0  # the decode forward of the running rows (with the admitted prompts' tokens when fused)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the requests' prompt tokens served from a cache (0 before any request)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


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
