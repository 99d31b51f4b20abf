#!/usr/bin/env bash
# Step caches on the demo model (issue 21): 28 Euler steps with each cache against the uncached 28
# steps (the reference), over 12 prompts, CPU f32, 2 threads. Writes docs/cache-bench/ (results
# table, JSON, CSV, plot.svg, pareto.svg, grid.png).
#   bash scripts/bench_cache.sh [model] [steps] [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-demo}
STEPS=${2:-28}
OUT=${3:-docs/cache-bench}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
cargo build --release -q
PROMPTS=$(mktemp)
trap 'rm -f "$PROMPTS"' EXIT
cat > "$PROMPTS" <<'P'
a red circle on a white background
a blue square on a black background
a green triangle on a gray background
a yellow circle on a black background
a purple square on a white background
an orange triangle on a black background
a red triangle on a gray background
a blue circle on a gray background
a green square on a white background
a yellow triangle on a white background
a purple circle on a black background
an orange square on a gray background
P
# Each cache with its default warm-up, then with longer ones (the first steps set the composition).
CACHES=none,fbcache:0.05,fbcache:0.08,fbcache:0.12,fbcache:0.1:6,fbcache:0.15:8
CACHES=$CACHES,teacache:0.1,teacache:0.2,teacache:0.4,teacache:0.15:6,teacache:0.2:8
CACHES=$CACHES,taylorseer:1:2,taylorseer:1:3,taylorseer:1:4,taylorseer:2:3,taylorseer:3:3
CACHES=$CACHES,taylorseer:1:2:4,taylorseer:1:3:8,taylorseer:1:4:8,taylorseer:2:3:8
mkdir -p "$OUT"
./target/release/mmdit bench --model "$MODEL" --steps "$STEPS" --reference-steps "$STEPS" \
  --prompts "$PROMPTS" --cache "$CACHES" --output-dir "$OUT" | tee "$OUT/table.md"
