#!/usr/bin/env bash
# Regenerates every figure in benchmarks/README.md and the results table in README.md, in one run.
# About 75 minutes on a 2-core CPU. Leave the machine otherwise idle while it runs: timings are compared
# only within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results
bin=.venv/bin/streamvox

# streaming load: the naive baseline and fcfs (from 0.2 req/s, where the lower rates tell nothing new about it)
# once; the streaming policy twice, 30 requests a rate, beside the engine's offline capacity for the same mix
rm -rf "$OUT"/serve*
$bin bench serve --systems naive,fcfs@0.2 --no-capacity --out "$OUT/serve-baselines"
for repeat in 1 2; do
  $bin bench serve --systems streaming --num-requests 30 --min-requests 30 --rates 0.1,0.2,0.3,0.4,0.5,0.7 \
    --out "$OUT/serve-$repeat"
done
# offline: N requests at once, beside the naive baseline and the raw model
$bin bench offline --batch-sizes 1,8,32 --out "$OUT/offline"
# closed loop: N clients streaming back to back, per policy
$bin bench streams --policies streaming,fcfs --streams 1,2,3,4,8 --out "$OUT/streams"
.venv/bin/python benchmarks/report.py "$OUT"
