#!/usr/bin/env bash
# The one-call GPU check (scripts/gpu_check.py says what it checks). Three ways to call it:
#
#   bash scripts/gpu_check.sh --prepare   here, once: fill .gpu_check/ (wheels the GPU image lacks, the tiny model,
#                                         SmolLM2-135M's config) within the device tool's 64 MiB; prints the sizes
#   bash scripts/gpu_check.sh             on the GPU machine (carry .gpu_check): install the wheels offline, run it
#   bash scripts/gpu_check.sh --cpu       anywhere: the same parts on the CPU, small (the test suite runs this)
#
# Extra arguments go to the Python module (--ray auto|on|off, --steps N, --work DIR). The JSON summary goes to
# $OUT/gpu_check.json when OUT is set, else to stdout. PYTHON picks the interpreter (default: .venv/bin/python
# for --prepare and --cpu when it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
default_py=python3
[ -x .venv/bin/python ] && default_py=.venv/bin/python

case "${1:-}" in
  --prepare)
    shift
    exec "${PYTHON:-$default_py}" scripts/gpu_check_prepare.py "$@"
    ;;
  --cpu)
    exec "${PYTHON:-$default_py}" scripts/gpu_check.py "$@"
    ;;
esac

# GPU mode: the machine's own python3 (it holds the CUDA build of torch); missing packages come from the folder.
PY=${PYTHON:-python3}
wheels=.gpu_check/wheels
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in $wheels: run 'bash scripts/gpu_check.sh --prepare' first and carry .gpu_check" >&2
  exit 2
fi
# Exact pins from the wheel names (NAME-VERSION-...whl), so pip takes these versions and nothing newer.
pins=$(for w in "$wheels"/*.whl; do basename "$w" | cut -d- -f1,2 | sed 's/-/==/'; done)
t0=$(date +%s)
# First the resolver, offline: what the image has satisfies what it can, the folder provides the rest.
# $pins is a word list on purpose.
# shellcheck disable=SC2086
if "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" $pins; then
  export GPU_CHECK_INSTALL="pip --no-index --find-links ($(( $(date +%s) - t0 )) s)"
else
  # The resolver refused (a requirement neither the image nor the folder meets, or an unwritable environment):
  # install the wheels as they are into a separate directory and put it first on the path.
  echo "gpu_check: the offline resolver install failed (above); installing the wheels with --no-deps instead" >&2
  site=/tmp/gpu_check_site
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
    --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
  export GPU_CHECK_INSTALL="pip --no-deps --target $site, after the resolver failed ($(( $(date +%s) - t0 )) s)"
fi
exec "$PY" scripts/gpu_check.py "$@"
