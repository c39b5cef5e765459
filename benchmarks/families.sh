#!/usr/bin/env bash
# The multi-codebook families on their tiny checkpoints: offline x real-time at 1 and 8 requests at once, and
# TTFA with 1 and 8 concurrent streams (streaming policy). About 5 minutes on a 2-core CPU; leave it idle.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results/families
bin=.venv/bin/streamvox
for family in csm qwen3-tts; do
  # 100 frames = 8 s of audio per request
  $bin bench offline --model "tiny-$family" --batch-sizes 1,8 --max-tokens 100 --out "$OUT/$family/offline"
  # 40 frames = 3.2 s per request, 2 requests per client back to back
  $bin bench streams --model "tiny-$family" --policies streaming --streams 1,8 --max-tokens 40 \
    --out "$OUT/$family/streams"
done
