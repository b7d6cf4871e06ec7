"""The malloc arena cap: set once per process, the user's MALLOC_ARENA_MAX left alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHILD = (
    "import os\n"
    "from pipeline.engines.malloc import limit_arenas\n"
    "print(limit_arenas(), os.environ.get('MALLOC_ARENA_MAX'))\n"
)


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env_extra
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_the_cap_is_set_and_exported_for_child_processes():
    assert _run({}) == "True 2"  # mallopt accepted it; Ray workers started from here inherit MALLOC_ARENA_MAX=2


def test_a_users_malloc_arena_max_stands():
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False 4"
