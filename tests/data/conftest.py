"""Shared fixtures for the data tests: one warm grader for the whole session (workers start once)."""

from __future__ import annotations

import pytest

from data.grading import Grader, GradingConfig


@pytest.fixture(scope="session")
def grader():
    # A short wall-clock bound keeps the adversarial cases (which must time out) quick.
    with Grader(GradingConfig(workers=2, timeout_s=2.0, worker_memory_mb=1024)) as g:
        yield g
