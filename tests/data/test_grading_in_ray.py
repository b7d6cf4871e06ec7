"""Grading inside a Ray actor: the wall-clock bound must hold off the main thread, where signals cannot."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


@pytest.mark.slow  # the session's local Ray cluster (tests/conftest.py) takes ~15 s to start on 2 cores
def test_grade_and_timeout_inside_an_actor(ray_session):
    @ray.remote(num_cpus=0)
    class GradingActor:
        def __init__(self):
            import data

            data.configure(data.GradingConfig(workers=1, timeout_s=2.0))

        def run(self, reference: str, prediction: str) -> tuple[bool, str]:
            # Called on the actor's worker thread pool (max_concurrency > 1): not the main thread.
            import threading

            import data

            problem = data.Problem(id="p", question="q", answer=reference, source="test")
            grade = data.grade_detailed(problem, prediction)
            return grade.correct, f"{grade.reason} [main thread: {threading.current_thread() is threading.main_thread()}]"

    actor = GradingActor.options(max_concurrency=2).remote()
    ok, why = ray.get(actor.run.remote("(x+1)^2", "x^2+2x+1"), timeout=120)
    assert ok and why.startswith("math-verify") and "main thread: False" in why
    ok, why = ray.get(actor.run.remote("1", "10^{10^{10}}"), timeout=120)
    assert not ok and why.startswith("timed out after 2 s"), why
