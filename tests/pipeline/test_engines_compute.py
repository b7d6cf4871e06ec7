"""pipeline.engines.compute: one thread runs a process's model compute, in order; the engines use it."""

from __future__ import annotations

import threading

import pytest

from pipeline.engines import GenerationConfig, PromptBuilder, compute


def test_run_returns_raises_and_nests_in_place():
    assert compute.run(lambda a, b=0: a + b, 2, b=3) == 5
    names = []
    compute.run(lambda: names.append(threading.current_thread().name))
    assert names == [compute.THREAD_NAME]
    with pytest.raises(ValueError, match="bad input"):
        compute.run(lambda: (_ for _ in ()).throw(ValueError("bad input")))
    # From the compute thread itself, run does not queue behind the job that calls it (that would deadlock).
    assert compute.run(lambda: compute.run(lambda: threading.current_thread().name)) == compute.THREAD_NAME


def test_jobs_run_in_the_order_they_came_and_close_starts_afresh():
    seen = []
    futures = [compute.submit(seen.append, i) for i in range(20)]
    for f in futures:
        f.result()
    assert seen == list(range(20))
    first = compute.run(threading.current_thread)
    compute.close()
    assert compute.run(threading.current_thread) is not first, "a closed compute thread is replaced by a new one"


def test_the_engine_computes_on_the_compute_thread_only(tiny, tok):
    """The shared prefix's forward and every tick's forwards run on the compute thread, whichever threads call the
    engine (two callers at once here, then the main thread)."""
    from mcts.protocols import SearchState
    from pipeline.engines import EngineConfig
    from pipeline.engines import _transformers as build

    cfg = EngineConfig(device="cpu", generation=GenerationConfig(temperature=1.0, max_new_tokens_step=6),
                       cpu_fast_path="fp32")
    threads = set()
    pol = build(cfg, tiny, PromptBuilder(tok, few_shot=False), "step", 0)
    pol.model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    states = [SearchState(f"t{i}", f"What is {i} plus {i}?", "", i) for i in range(4)]
    callers = [threading.Thread(target=pol.propose, args=(states[i : i + 2], 2)) for i in (0, 2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    pol.propose(states[:1], 1)
    assert threads == {compute.THREAD_NAME}
