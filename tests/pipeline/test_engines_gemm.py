"""Row-independent fp32 products: what continuous batching's per-request determinism rests on (engines/gemm.py).
Each case runs in a fresh interpreter, since MKL reads MKL_CBWR once, at its first call."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL")

SCRIPT = """
import sys
from pipeline.engines.gemm import fix_gemm_order, rows_are_independent
set_here = fix_gemm_order() if sys.argv[1] == "fix" else None
import os, torch
print(set_here, os.environ.get("MKL_CBWR"), rows_are_independent())
"""


def _run(mode: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | {"PYTHONPATH": str(ROOT)} | env_extra
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_entry_points_make_every_row_count_give_the_same_bits():
    # (bf16's answer depends on the CPU: False on the development machine, whatever MKL_CBWR says; gemm.py.)
    assert _run("fix") == "True AUTO,STRICT True"
    # The user's own setting stands (and is what MKL then uses).
    assert _run("fix", MKL_CBWR="AUTO,STRICT") == "False AUTO,STRICT True"

