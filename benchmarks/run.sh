#!/usr/bin/env bash
# Regenerates every figure in benchmarks/README.md and the results table in README.md, in one run.
# About 35 minutes on a 2-core CPU. Leave the machine otherwise idle while it runs: timings are compared
# only within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results
bin=.venv/bin/streamvox

# streaming load: the naive baseline (from 0.1 req/s) and fcfs (from 0.4 req/s, where the lower rates tell
# nothing new about them) once; the streaming policy twice, 30 requests a rate, beside the engine's offline
# capacity for the same mix
rm -rf "$OUT"/serve*
$bin bench serve --systems naive@0.1,fcfs@0.4 --num-requests 30 --min-requests 30 --no-capacity \
  --out "$OUT/serve-baselines"
for repeat in 1 2; do
  $bin bench serve --systems streaming --num-requests 30 --min-requests 30 --rates 0.5,1,1.5,2,2.5,3,3.5,4 \
    --out "$OUT/serve-$repeat"
done
# offline: N requests at once, beside the naive baseline and the raw model
$bin bench offline --batch-sizes 1,8,32 --out "$OUT/offline"
# closed loop: N streams of about 13 s at once, per policy, up to about four times what the engine keeps
$bin bench streams --policies streaming,fcfs --streams 1,4,8,12,16,60 --rounds 1 --max-tokens 1200 \
  --out "$OUT/streams"
.venv/bin/python benchmarks/report.py "$OUT"
