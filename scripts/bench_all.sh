#!/usr/bin/env bash
# Speed comparison with diffusers on the synthetic real-width models (scripts/make_bench_models.py),
# same machine, same size, same steps, 2 threads. Writes bench-results/<model>-<dtype>-{mmdit,diffusers}.json
# and prints the side-by-side tables.
#   bash scripts/bench_all.sh [steps] [python]      (DTYPES="bf16" to run one dtype, MODELS="flux2-bench"
#   to run one model, RUNS=3 to alternate the two engines three times and print the median of each
#   phase's per-run ratio: on a VM whose speed moves between minutes, a ratio from one run is noise)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-4}
PY=${2:-python3}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
mkdir -p bench-results
[ -d bench-models/sd3-bench ] || "$PY" scripts/make_bench_models.py
[ -d bench-models/flux2-bench ] || "$PY" scripts/make_bench_models.py --only flux2
[ -d bench-models/text-bench ] || "$PY" scripts/make_bench_models.py --only text
cargo build --release -q
for model in ${MODELS:-sd3-bench flux-bench flux2-bench text-bench}; do
  for dtype in ${DTYPES:-f32 bf16}; do
    runs=()
    for run in $(seq "${RUNS:-1}"); do
      "$PY" scripts/bench_diffusers.py --model "bench-models/$model" --steps "$STEPS" --width 512 --height 512 \
        --dtype "$dtype" --threads 2 --out "bench-results/$model-$dtype-diffusers.json" >/dev/null
      ./target/release/mmdit bench --model "bench-models/$model" --steps "$STEPS" --width 512 --height 512 \
        --dtype "$dtype" --no-reference --format json --compare "bench-results/$model-$dtype-diffusers.json" \
        --output-dir "bench-results/$model-$dtype" > "bench-results/$model-$dtype.txt"
      cp "bench-results/$model-$dtype/results.json" "bench-results/$model-$dtype-mmdit.json"
      sed -n '/ vs /,$p' "bench-results/$model-$dtype.txt"
      if [ "${RUNS:-1}" -gt 1 ]; then
        for engine in mmdit diffusers; do
          cp "bench-results/$model-$dtype-$engine.json" "bench-results/$model-$dtype-$engine-run$run.json"
        done
        runs+=("bench-results/$model-$dtype-mmdit-run$run.json" "bench-results/$model-$dtype-diffusers-run$run.json")
      fi
    done
    if [ "${#runs[@]}" -gt 0 ]; then
      # Each run's ratio is of the two engines measured back to back; the median of those ratios.
      "$PY" - "${runs[@]}" <<'PY'
import json, statistics, sys
pairs = [(json.load(open(a)), json.load(open(b))) for a, b in zip(sys.argv[1::2], sys.argv[2::2])]
ratios = {}
for m, d in pairs:
    ratios.setdefault("load + first run", []).append((m["load_s"] + m["first_run_s"]) / (d["load_s"] + d["first_run_s"]))
    for phase in ("text", "step", "decode"):
        a, b = m["rows"][0][phase + "_s"]["median"], d["rows"][0][phase + "_s"]["median"]
        if b:
            ratios.setdefault(phase, []).append(a / b)
    ratios.setdefault("peak RSS", []).append(m["peak_rss_bytes"] / d["peak_rss_bytes"])
print(f"mmdit / diffusers over {len(pairs)} alternated runs (median of the per-run ratios, range):")
for phase, r in ratios.items():
    print(f"  {phase}: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
PY
    fi
    # What each engine holds between runs (no activations) against its weights: the peak RSS
    # floor's "1.15x the weights" part; and our peak with almost no activations (64x64, one step).
    "$PY" -c 'import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f)); e, h, w = r["engine"], r.get("held_bytes"), r.get("weight_bytes")
    if h and w:
        print(f"{e} held between runs: {h / 2**20:.0f} MiB, {h / w:.2f}x the weights ({w / 2**20:.0f} MiB)")' \
      "bench-results/$model-$dtype-mmdit.json" "bench-results/$model-$dtype-diffusers.json"
    ./target/release/mmdit bench --model "bench-models/$model" --steps 1 --width 64 --height 64 \
      --dtype "$dtype" --no-reference --format json --output-dir "bench-results/$model-$dtype-64" >/dev/null
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); h, w = r["peak_rss_bytes"], r.get("weight_bytes")
print(f"mmdit peak RSS at 64x64, 1 step: {h / 2**20:.0f} MiB" + (f", {h / w:.2f}x the weights ({w / 2**20:.0f} MiB)\n" if w else "\n"))' \
      "bench-results/$model-$dtype-64/results.json"
  done
done
