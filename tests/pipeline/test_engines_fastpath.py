"""pipeline.engines.fastpath: 'auto' picks the fastest path that keeps fp32's greedy text, and a machine's
decision is cached so every later engine start takes it, after its greedy check on that start's checkpoint; on
tiny-random (random weights: near-flat logits, so bf16 and int8 change its greedy text, which is what the
never-picked check needs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.engines import GenerationConfig, PromptBuilder, fastpath
from pipeline.engines.probe_cache import CACHE_ENV, CACHE_FILE, REPROBE_ENV, weights_id


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(REPROBE_ENV, raising=False)
    return tmp_path / CACHE_FILE


def _auto(path: Path, tok, rows: int = 4):
    from pipeline.engines.hf_policy import TransformersPolicy

    return TransformersPolicy(path, PromptBuilder(tok, few_shot=False),
                              GenerationConfig(temperature=0.0, max_new_tokens_step=4), "step", device="cpu",
                              cpu_fast_path="auto", max_batch_rows=rows)


def _entries(cache: Path) -> dict:
    return json.loads(cache.read_text())["entries"]


def test_pick_is_the_fastest_path_whose_greedy_text_agrees():
    agree_all = {"fp32": True, "bf16": True, "int8": True}
    assert fastpath.pick({"fp32": 100.0, "bf16": 150.0, "int8": 120.0}, agree_all) == "bf16"
    # int8 is the fastest but changes the greedy text: the fastest of the others
    assert fastpath.pick({"fp32": 100.0, "bf16": 150.0, "int8": 300.0}, {**agree_all, "int8": False}) == "bf16"
    # nothing agrees but the reference: fp32 however slow
    assert fastpath.pick({"fp32": 10.0, "bf16": 150.0, "int8": 300.0}, {"fp32": True}) == "fp32"
    # a path that agrees but is slower than fp32 is not taken; a tie goes to the earlier path (fp32)
    assert fastpath.pick({"fp32": 100.0, "bf16": 99.0}, agree_all) == "fp32"
    assert fastpath.pick({"fp32": 100.0, "bf16": 100.0}, agree_all) == "fp32"
    with pytest.raises(ValueError, match="no fp32 timing"):
        fastpath.pick({"bf16": 1.0}, agree_all)


def test_probe_picks_an_agreeing_path_and_caches_it_for_the_next_start(tiny, tok, cache):
    first = _auto(tiny, tok)
    p = first.probe
    assert p.source == "probe" and cache.is_file(), (p, cache)
    assert set(p.tok_per_s) == set(fastpath.FAST_PATHS) and all(v > 0 for v in p.tok_per_s.values()), p.tok_per_s
    assert p.agrees["fp32"] and p.agrees[p.chosen], p
    assert p.chosen == fastpath.pick(p.tok_per_s, p.agrees)
    for path, same in p.agrees.items():
        if not same:
            assert p.chosen != path, f"{path} changes fp32's greedy text but was picked: {p}"
    [entry] = _entries(cache).values()
    assert entry["chosen"] == p.chosen and entry["key"]["threads"] == torch.get_num_threads(), entry
    assert entry["key"]["rows"] == 4 and entry["key"]["model"]["model_type"] == "llama", entry["key"]

    assert entry["checked"] == {weights_id(tiny): p.agrees}, "the probe's greedy checks are this checkpoint's"

    # The stored decision is what the next start takes, without timing: edit it to another path (one this
    # checkpoint's greedy check passed) and see it used.
    other = next(x for x in ("bf16", "fp32") if x != p.chosen)
    data = json.loads(cache.read_text())
    stored = next(iter(data["entries"].values()))
    stored["chosen"] = other
    stored["checked"][weights_id(tiny)][other] = True
    cache.write_text(json.dumps(data))
    second = _auto(tiny, tok)
    assert (second.probe.source, second.probe.chosen) == ("cache", other), second.probe
    assert second.model.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[other]
    assert "from cache" in second.probe.summary()
    assert len(second.propose([_state()], 1)) == 1


def test_a_cached_pick_is_used_on_another_checkpoint_only_if_its_greedy_text_agrees_there(tiny, tok, cache,
                                                                                          monkeypatch):
    _auto(tiny, tok)
    # As a probe on another checkpoint of this architecture would have left it: bf16 fastest, every path agreeing.
    data = json.loads(cache.read_text())
    entry = next(iter(data["entries"].values()))
    entry.update(chosen="bf16", tok_per_s={"fp32": 10.0, "bf16": 30.0, "int8": 20.0},
                 agrees=dict.fromkeys(fastpath.FAST_PATHS, True))
    del entry["checked"]
    cache.write_text(json.dumps(data))
    # On tiny-random's weights bf16 and int8 both change fp32's greedy text on the probe prompt.
    pol = _auto(tiny, tok)
    assert (pol.probe.source, pol.probe.chosen, pol.model.dtype) == ("cache", "fp32", torch.float32), pol.probe
    assert "bf16 changes this checkpoint's greedy text" in pol.probe.summary(), pol.probe.summary()
    assert not pol.probe.agrees["bf16"] and not pol.probe.agrees["int8"], pol.probe
    [entry] = _entries(cache).values()
    assert entry["chosen"] == "bf16" and entry["checked"] == {weights_id(tiny): {"bf16": False, "int8": False}}

    # Checked once per checkpoint: the next start decides from the record, without decoding.
    def no_decoding(*a, **k):
        raise AssertionError("greedy check repeated for a checkpoint already checked")

    monkeypatch.setattr(fastpath, "greedy_tokens", no_decoding)
    assert _auto(tiny, tok).probe.chosen == "fp32"
    # A checkpoint on which the pick agrees takes it (recorded here as such a check would).
    data = json.loads(cache.read_text())
    next(iter(data["entries"].values()))["checked"][weights_id(tiny)] = {"bf16": True}
    cache.write_text(json.dumps(data))
    again = _auto(tiny, tok)
    assert (again.probe.chosen, again.model.dtype) == ("bf16", torch.bfloat16), again.probe


def test_reprobe_and_another_key_measure_again(tiny, tok, cache, monkeypatch):
    first = _auto(tiny, tok)
    assert first.probe.source == "probe"
    # Another batch size is another key: a second entry, the first kept.
    assert _auto(tiny, tok, rows=2).probe.source == "probe"
    assert sorted(e["key"]["rows"] for e in _entries(cache).values()) == [2, 4]
    monkeypatch.setenv(REPROBE_ENV, "1")
    again = _auto(tiny, tok)
    assert again.probe.source == "probe" and "OPEN_RSTAR_REPROBE" in again.probe.note, again.probe
    assert len(_entries(cache)) == 2, "a re-probe replaces its key's entry"


def test_an_unreadable_cache_is_replaced_by_a_fresh_probe(tiny, tok, cache):
    cache.write_text("{not json")
    pol = _auto(tiny, tok)
    assert pol.probe.source == "probe" and "cache unreadable" in pol.probe.note, pol.probe
    assert len(_entries(cache)) == 1
    assert _auto(tiny, tok).probe.source == "cache"


def test_a_named_path_skips_the_probe_and_the_cache(tiny, tok, cache):
    from pipeline.engines.hf_policy import TransformersPolicy

    pol = TransformersPolicy(tiny, PromptBuilder(tok), GenerationConfig(), "step", device="cpu", cpu_fast_path="bf16")
    assert (pol.probe.source, pol.probe.chosen, pol.model.dtype) == ("named", "bf16", torch.bfloat16)
    assert not cache.exists()


def _state():
    from mcts.protocols import SearchState

    return SearchState("t0", "What is 2 plus 3?", "", 7)
