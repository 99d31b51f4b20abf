#!/usr/bin/env bash
# What GGUF weights cost and save on this CPU (issue 18), one run:
# 1. flux-bench and sd3-bench (scripts/make_bench_models.py) converted by `mmdit convert` to Q8_0,
#    Q4_K and Q4_0, benched beside the bf16 folder: s/step, load, peak RSS (bf16, 512x512, 4 Euler
#    steps);
# 2. peak RSS of a small run (64x64, 1 step: activations near zero) against the bytes of the weights
#    the run holds (scripts/resident_weights.py);
# 3. the demo model converted to every type, its image (bf16, same seed) against the bf16 image: PSNR
#    and file size.
#   bash scripts/bench_gguf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
[ -d bench-models/flux-bench ] || python3 scripts/make_bench_models.py
cargo build --release -q
M=./target/release/mmdit
G=bench-models/gguf
mkdir -p "$G" bench-results/gguf
for m in flux-bench sd3-bench; do
  for t in q8_0 q4_k q4_0; do
    [ -f "$G/$m-$t.gguf" ] || $M convert "bench-models/$m" --quantize "$t" -o "$G/$m-$t.gguf"
  done
done

# bench M T STEPS SIZE: one bench run of model M with weights T (bf16: the folder; else its GGUF),
# printed as "file MB|load s|s/step|peak RSS MiB".
bench() {
  local m=$1 t=$2 args mb=- out
  if [ "$t" = bf16 ]; then args=(--model "bench-models/$m")
  else args=(--model "$G/$m-$t.gguf" --components "bench-models/$m")
       mb=$(( $(stat -c %s "$G/$m-$t.gguf") / 1000000 )); fi
  out=$($M bench "${args[@]}" --dtype bf16 --steps "$3" --width "$4" --height "$4" --no-reference 2>&1)
  echo "$mb|$(echo "$out" | sed -n 's/.*| load \([0-9.]*\)s.*/\1/p')|$(echo "$out" | awk -F'|' '/^\| euler/ {print $6}' | awk '{print $1}')|$(echo "$out" | sed -n 's/.*peak RSS \([0-9]*\) MiB.*/\1/p')"
}

echo "## speed and memory (bf16 compute, 512x512, 4 steps)"
echo "| model | weights | file MB | load s | s/step | peak RSS MiB |"
echo "|---|---|---|---|---|---|"
for m in flux-bench sd3-bench; do
  for t in bf16 q8_0 q4_k q4_0; do
    IFS='|' read -r mb load step rss <<< "$(bench "$m" "$t" 4 512)"
    echo "| $m | $t | $mb | $load | $step | $rss |"
  done
done

echo
echo "## peak RSS with activations near zero (64x64, 1 step) against the weights the run holds"
echo "| model | weights | file MB | peak RSS MiB | weights held MiB | ratio |"
echo "|---|---|---|---|---|---|"
for m in flux-bench sd3-bench; do
  for t in bf16 q8_0 q4_k q4_0; do
    IFS='|' read -r mb _ _ rss <<< "$(bench "$m" "$t" 1 64)"
    if [ "$t" = bf16 ]; then held=$(python3 scripts/resident_weights.py "bench-models/$m")
    else held=$(python3 scripts/resident_weights.py "bench-models/$m" "$G/$m-$t.gguf"); fi
    echo "| $m | $t | $mb | $rss | $held | $(python3 -c "print(f'{$rss / $held:.2f}')") |"
  done
done

echo
echo "## the demo model at every type (bf16 compute, seed 1, 28 steps) against its bf16 image"
D=bench-results/gguf
gen() { $M generate --prompt "a lighthouse on a cliff at sunset" --seed 1 --dtype bf16 --output "$@" >/dev/null 2>&1; }
gen "$D/demo-bf16.png" --model demo
echo "| type | file KB | PSNR dB |"
echo "|---|---|---|"
for t in f16 q8_0 q6_k q5_k q5_1 q5_0 q4_k q4_1 q4_0 q3_k q2_k; do
  $M convert demo --quantize "$t" -o "$D/demo-$t.gguf" >/dev/null
  gen "$D/demo-$t.png" --model "$D/demo-$t.gguf" --components demo
  p=$(python3 -c "
import sys, numpy as np; from PIL import Image
a, b = (np.asarray(Image.open(f)).astype(float) for f in sys.argv[1:])
m = ((a - b) ** 2).mean(); print('inf' if m == 0 else f'{10 * np.log10(255 ** 2 / m):.1f}')" "$D/demo-bf16.png" "$D/demo-$t.png")
  echo "| $t | $(( $(stat -c %s "$D/demo-$t.gguf") / 1000 )) | $p |"
done
