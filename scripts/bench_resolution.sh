#!/usr/bin/env bash
# How a step's cost grows with the image: step time of mmdit and diffusers at 256, 512, 768 and 1024
# pixels a side on the real-width bench models (scripts/make_bench_models.py), bf16, 2 threads, same
# machine and run, with mmdit's attention share from its profile (MMDIT_PROFILE=1). Writes
# bench-results/resolution/<model>-<size>-{mmdit,diffusers}.json and prints a Markdown table.
#   bash scripts/bench_resolution.sh [steps] [python]   (MODELS=..., SIZES=..., DTYPE=f32 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-2}
PY=${2:-python3}
DTYPE=${DTYPE:-bf16}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
out=bench-results/resolution
mkdir -p "$out"
[ -d bench-models/sd3-bench ] || "$PY" scripts/make_bench_models.py
cargo build --release -q
for model in ${MODELS:-sd3-bench flux-bench}; do
  for size in ${SIZES:-256 512 768 1024}; do
    base="$out/$model-$size-$DTYPE"
    "$PY" scripts/bench_diffusers.py --model "bench-models/$model" --steps "$STEPS" --width "$size" --height "$size" \
      --dtype "$DTYPE" --threads 2 --out "$base-diffusers.json" >/dev/null 2>&1
    MMDIT_PROFILE=1 ./target/release/mmdit bench --model "bench-models/$model" --steps "$STEPS" --width "$size" \
      --height "$size" --dtype "$DTYPE" --no-reference --format json --output-dir "$base" > "$base.txt"
    cp "$base/results.json" "$base-mmdit.json"
  done
done
"$PY" - "$out" "$DTYPE" ${MODELS:-sd3-bench flux-bench} -- ${SIZES:-256 512 768 1024} <<'PY'
import json, re, sys
out, dtype = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
models, sizes = rest[:rest.index("--")], rest[rest.index("--") + 1:]
print(f"| model | size | tokens (image) | mmdit s/step | diffusers s/step | ratio | mmdit attention share |")
print("|---|---|---|---|---|---|---|")
for m in models:
    for s in sizes:
        base = f"{out}/{m}-{s}-{dtype}"
        ours = json.load(open(f"{base}-mmdit.json"))["rows"][0]["step_s"]["median"]
        theirs = json.load(open(f"{base}-diffusers.json"))["rows"][0]["step_s"]["median"]
        share = "-"
        try:
            for line in open(f"{base}/profile.md"):
                if line.startswith("| attention core"):
                    share = line.split("|")[3].strip()
        except OSError:
            pass
        tokens = (int(s) // 16) ** 2
        print(f"| {m} | {s} | {tokens} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {share} |")
PY
