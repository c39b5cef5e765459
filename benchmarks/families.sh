#!/usr/bin/env bash
# The families beside Orpheus on their tiny checkpoints: offline x real-time at 1 and 8 requests at once, and
# TTFA with 1 and 8 concurrent streams (streaming policy). About 5 minutes on a 2-core CPU; leave it idle.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results/families
bin=.venv/bin/streamvox
# family, frames per second (one backbone step each): 8 s of audio per request offline, 3.2 s per streamed one
for spec in csm:12.5 qwen3-tts:12.5 cosyvoice2:25 chatterbox:25; do
  family=${spec%%:*} rate=${spec##*:}
  offline=$(python3 -c "print(round(8 * $rate))") streamed=$(python3 -c "print(round(3.2 * $rate))")
  $bin bench offline --model "tiny-$family" --batch-sizes 1,8 --max-tokens "$offline" --out "$OUT/$family/offline"
  # 2 requests per client back to back
  $bin bench streams --model "tiny-$family" --policies streaming --streams 1,8 --max-tokens "$streamed" \
    --out "$OUT/$family/streams"
done
