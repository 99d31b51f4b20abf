#!/usr/bin/env bash
# What a LoRA costs on flux-bench (scripts/make_bench_models.py, scripts/make_bench_loras.py), CPU, 2
# threads, 512x512, 4 steps, bf16: load time without LoRA and with a rank-64 LoRA merged (the merge),
# and the step time without LoRA, with a rank-16 LoRA merged, and with it at run time.
#   bash scripts/bench_lora.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
[ -d bench-models/flux-bench ] || python3 scripts/make_bench_models.py
[ -f bench-models/loras/flux-bench-r64.safetensors ] || python3 scripts/make_bench_loras.py
cargo build --release -q
L=bench-models/loras
for run in $(seq "$RUNS"); do
  for cfg in "none|" "r64 merged|--lora $L/flux-bench-r64.safetensors" \
             "r16 merged|--lora $L/flux-bench-r16.safetensors" \
             "r16 runtime|--lora $L/flux-bench-r16.safetensors --lora-apply runtime"; do
    name=${cfg%%|*}; extra=${cfg#*|}
    # shellcheck disable=SC2086
    out=$(./target/release/mmdit bench --model bench-models/flux-bench --dtype bf16 --steps 4 --width 512 \
      --height 512 --no-reference --output-dir "bench-results/lora-$run" $extra 2>&1)
    load=$(echo "$out" | sed -n 's/.*| load \([0-9.]*\)s.*/\1/p')
    step=$(echo "$out" | awk -F'|' '/^\| euler/ {print $6}')
    echo "run $run | $name | load ${load}s | s/step$step"
  done
done
