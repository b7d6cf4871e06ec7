"""Built-in problem generators, seeded and reproducible, with exact answers: name -> generate(n, seed, difficulty)."""

from __future__ import annotations

from collections.abc import Callable

from data.generators.arithmetic import generate_arithmetic
from data.generators.countdown import generate_countdown, solve
from data.problem import Problem

GENERATORS: dict[str, Callable[..., list[Problem]]] = {
    "arithmetic": generate_arithmetic,
    "countdown": generate_countdown,
}

__all__ = ["GENERATORS", "generate_arithmetic", "generate_countdown", "solve"]
