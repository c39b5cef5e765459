#!/usr/bin/env bash
# Scale-out on this machine: streams kept by 1 and 2 engines behind one server, round robin against routing by
# headroom with one engine slowed, two Ray Serve replicas, and 100 lines of offline batch locally and on Ray
# Data. About 8 minutes on a 2-core CPU; leave it idle. Ray runs in a private network namespace (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
export STREAMVOX_CACHE="${STREAMVOX_CACHE:-$PWD/.cache}"
OUT=benchmarks/results/scale_out
bin=.venv/bin/streamvox
rm -rf "$OUT" && mkdir -p "$OUT"

# closed loop, about 4.3 s streams (350 tokens), one round: how many streams each setup keeps
for engines in 1 2; do
  $bin bench streams --policies streaming --streams 4,8,12,16 --rounds 1 --max-tokens 350 \
    --serve-args "--data-parallel $engines" --out "$OUT/engines-$engines"
done
# engine 0 slowed by 20 ms a step (a test hook): blind round robin against routing by headroom
for routing in round-robin load; do
  STREAMVOX_SLOW_ENGINE=0:0.02 $bin bench streams --policies streaming --streams 4 --rounds 1 --max-tokens 350 \
    --serve-args "--data-parallel 2 --data-parallel-routing $routing" --out "$OUT/slowed-$routing"
done

# Ray Serve: two replicas, 8 concurrent streams through the official openai client
mkdir -p "$OUT/ray-serve"
unshare -n sh -c "ip link set lo up && exec .venv/bin/python tests/deploy/ray_serve_scenario.py tiny-orpheus \
  $OUT/ray-serve" > "$OUT/ray-serve/log.txt" 2>&1
rm -f "$OUT"/ray-serve/*.pcm
.venv/bin/python -c "import json,sys; s=json.load(open('$OUT/ray-serve/summary.json')); \
print(f\"ray serve: up in {s['up_s']:.1f} s, 8 streams of 1.75 s each in {min(s['stream_s']):.2f}-{max(s['stream_s']):.2f} s\")"

# offline batch: 100 lines (about 0.27 s of audio each), locally and on Ray Data with 1 and 2 engine actors
.venv/bin/python -c "import json
for i in range(100):
    print(json.dumps({'id': f'item-{i:03d}', 'text': f'Sentence number {i} for the batch.', 'max_tokens': 28, 'seed': i}))
" > "$OUT/texts.jsonl"
run_batch() {  # name, then the command's extra arguments
  local name=$1; shift
  local started=$(date +%s.%N)
  "$@" > "$OUT/batch-$name.log" 2>&1
  .venv/bin/python -c "import json; audio=sum(json.loads(l)['audio_s'] for l in open('$OUT/batch-$name/manifest.jsonl'))
wall=$(date +%s.%N)-$started; print(f'batch $name: {audio:.1f} s of audio in {wall:.1f} s wall: {audio/wall:.2f}x real time')" \
    | tee -a "$OUT/batch.txt"
}
run_batch local $bin batch "$OUT/texts.jsonl" --out "$OUT/batch-local"
for engines in 1 2; do
  run_batch "ray-$engines" unshare -n sh -c "ip link set lo up && exec $bin batch $OUT/texts.jsonl \
    --out $OUT/batch-ray-$engines --ray --engines $engines"
done
rm -rf "$OUT"/batch-*/ "$OUT/texts.jsonl"
