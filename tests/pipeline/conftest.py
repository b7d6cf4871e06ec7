"""Fixtures shared by the engine tests: the tiny random model (made by the code, no hub) and its tokenizer."""

from pathlib import Path

import pytest

from rounds.models import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model("tiny-random")


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)
