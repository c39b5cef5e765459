#!/usr/bin/env bash
# `streamvox bench gpu` on a bare GPU machine, under that machine's own python3 and torch: the project on
# PYTHONPATH, and the one small wheel it lacks (snac) from .whl/ (benchmarks/README.md says how to bring it).
# About 7 minutes on one H100/H200. Usage: benchmarks/gpu.sh [OUT_DIR [bench gpu flags...]]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/gpu}"
shift || true
python="${PYTHON:-python3}"
if [ "${CUDA_LAUNCH_BLOCKING:-0}" != 0 ]; then
  echo "note: unsetting CUDA_LAUNCH_BLOCKING=$CUDA_LAUNCH_BLOCKING for the benchmark (it makes every launch wait)" >&2
  unset CUDA_LAUNCH_BLOCKING
fi
if ! "$python" -c "import snac" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "snac is not installed and .whl/ holds no wheels: see benchmarks/README.md, 'On a GPU'" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/streamvox-site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/streamvox-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
exec "$python" -m streamvox.cli bench gpu --out "$out" "$@"
