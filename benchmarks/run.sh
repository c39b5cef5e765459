#!/usr/bin/env bash
# Regenerates every figure in benchmarks/README.md and the results table in README.md, in one run.
# About two and a half hours on a 2-core CPU (the serve sweep runs twice, 30 requests a rate). Leave the machine otherwise idle while it runs: timings are compared
# only within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results
bin=.venv/bin/streamvox

# streaming load, twice, 30 requests a rate: naive baseline, our engine with the streaming policy, and with fcfs
# (from 0.2 req/s, where the lower rates tell nothing new about it); the report shows both repeats' goodput
rm -rf "$OUT"/serve*
for repeat in 1 2; do
  $bin bench serve --systems naive,streaming,fcfs@0.2 --num-requests 30 --min-requests 30 --out "$OUT/serve-$repeat"
done
# offline: N requests at once, beside the naive baseline and the raw model
$bin bench offline --batch-sizes 1,8,32 --out "$OUT/offline"
# closed loop: N clients streaming back to back, per policy
$bin bench streams --policies streaming,fcfs --streams 1,4,8,16 --out "$OUT/streams"
.venv/bin/python benchmarks/report.py "$OUT"
