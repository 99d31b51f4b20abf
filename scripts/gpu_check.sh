#!/usr/bin/env bash
# Issue 9's GPU check, in two halves (README "Backends"):
#
#   bash scripts/gpu_check.sh build   # here, no GPU needed: the CUDA binary and the CUDA parity test
#                                     # binaries, stripped and packed into .gpu/bins.tar.xz (~MBs)
#   bash scripts/gpu_check.sh run     # on the GPU machine, from the repository root with .gpu/ present
#
# What travels to the GPU machine is limited to 64 MiB (tracked files, untracked files not ignored,
# carried paths); the tracked files alone are ~54 MB, the binaries ~21 MB and diffusers' wheels ~6 MB.
#   bash scripts/gpu_check.sh slim    # untracks (in the index only, files stay) what `run` does not read
#   bash scripts/gpu_check.sh unslim  # tracks them again (git reset of those paths)
# so a session runs: build, slim, device run (carry .gpu and .whl), unslim.
#
# `run` needs python3 with torch (CUDA), and diffusers 0.42.1 importable (or its wheel in .whl/, with
# importlib_metadata's: the H200 image has neither; `pip download --no-deps` them), and
# writes everything under $OUT (default gpu-results/):
#   1. parity tests on CUDA: f32 at the CPU tolerances, bf16 images PSNR >= 30 dB against diffusers' f32;
#   2. speed at 1024x1024, bf16, against PyTorch/diffusers on the same machine and the same random
#      weights: full-width SD3-medium and FLUX.1-dev transformers (all layers), the real VAEs.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(parity)
PY=${PYTHON:-python3}
# Overrides for a dry run of `run` without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=256 GPU_CHECK_FULL=
DEV=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-1024}
FULL=${GPU_CHECK_FULL---full}

build() {
    # shellcheck source=scripts/cuda_env.sh
    source scripts/cuda_env.sh
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
    cargo build --release --locked --features cuda
    local args=()
    for t in "${TESTS[@]}"; do args+=(--test "$t"); done
    cargo test --release --locked --features cuda --no-run "${args[@]}" --message-format=json >"$CARGO_TARGET_DIR/tests.json"
    rm -rf .gpu/bin && mkdir -p .gpu/bin
    cp "$CARGO_TARGET_DIR/release/mmdit" .gpu/bin/mmdit
    python3 - "$CARGO_TARGET_DIR/tests.json" "${TESTS[@]}" <<'PY'
import json, shutil, sys
want = set(sys.argv[2:])
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        shutil.copy(m["executable"], ".gpu/bin/" + m["target"]["name"])
PY
    strip .gpu/bin/*
    tar -C .gpu -cJf .gpu/bins.tar.xz bin
    rm -rf .gpu/bin
    ls -l .gpu
}

run() {
    # $OUT gets summary.txt and details.tar.gz (refreshed after each phase, so a run cut short still
    # returns what it measured); the detailed logs and JSON are written to $DETAIL.
    OUT=${OUT:-gpu-results}
    local DETAIL=${GPU_CHECK_DETAIL:-/tmp/mmdit-gpu-detail}
    mkdir -p "$OUT" "$DETAIL"
    local t0=$SECONDS
    log() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$OUT/summary.txt"; }
    pack() { cp "$OUT/summary.txt" "$DETAIL/" && tar -C "$DETAIL" -czf "$OUT/details.tar.gz" . || true; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$OUT/summary.txt" || true
    # The CUDA 13 libraries (cuBLAS, cuRAND, NVRTC, runtime) of the machine's PyTorch environment.
    local nv
    nv=$("$PY" -c 'import nvidia, os; print(nvidia.__path__[0])')
    LD_LIBRARY_PATH=$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH
    "$PY" -c "import tarfile; tarfile.open('.gpu/bins.tar.xz').extractall('.gpu')"
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export MMDIT_TEST_ROOT=$PWD MMDIT_MODELS_DIR=$PWD/models MMDIT_TEST_DEVICE=$DEV RUST_BACKTRACE=0

    # Runs "$@" while sampling the GPU's used memory every 100 ms into $1 (MiB, one line each):
    # the device memory a whole process takes (context, allocator caches and all), the same
    # measure for diffusers and mmdit.
    sampled() {
        local file=$1 rc=0 sampler=
        shift
        if [ "$DEV" = cuda ]; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$file" 2>/dev/null &
            sampler=$!
        fi
        "$@" || rc=$?
        [ -n "$sampler" ] && { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true; }
        return "$rc"
    }
    peak_mib() { sort -n "$1" 2>/dev/null | tail -1; }

    log "1. parity on $DEV"
    for t in "${TESTS[@]}"; do
        if timeout 180 ".gpu/bin/$t" --test-threads 1 --nocapture >"$DETAIL/test-$t.txt" 2>&1; then
            log "$t: passed"
        else
            log "$t: FAILED (see test-$t.txt)"
        fi
        grep -E "ratio|PSNR|max diff|test result|panicked" "$DETAIL/test-$t.txt" | sed 's/^/    /' >>"$OUT/summary.txt" || true
        grep -E "PSNR|test result|panicked" "$DETAIL/test-$t.txt" || true
    done
    pack

    log "2. speed at ${SIZE}x$SIZE bf16"
    local models=/tmp/mmdit-bench-models steps=${GPU_BENCH_STEPS:-10}
    for m in sd3 flux; do
        local name args
        if [ "$m" = sd3 ]; then
            name=sd3-medium-full; args=(--guidance 7 --max-sequence-length 256)
        else
            name=flux-dev-full; args=(--guidance 3.5 --max-sequence-length 512)
        fi
        [ -z "$FULL" ] && name=${name/-medium-full/-bench} && name=${name/-dev-full/-bench}
        # shellcheck disable=SC2086
        timeout 240 "$PY" scripts/make_bench_models.py $FULL --only "$m" --device "$DEV" --dtype bf16 --out "$models" \
            >"$DETAIL/make-$name.txt" 2>&1 || { log "$name: making the model failed"; tail -5 "$DETAIL/make-$name.txt"; continue; }
        log "$name written ($(du -sh "$models/$name" | cut -f1))"
        sampled "$DETAIL/$name-diffusers-mem.txt" timeout 240 "$PY" scripts/bench_diffusers.py --model "$models/$name" --device "$DEV" --dtype bf16 \
            --width "$SIZE" --height "$SIZE" --steps "$steps" "${args[@]}" --out "$DETAIL/$name-diffusers.json" \
            >"$DETAIL/$name-diffusers.txt" 2>&1 || log "$name: diffusers failed ($(tail -1 "$DETAIL/$name-diffusers.txt"))"
        log "$name: diffusers done"
        pack
        local bench=(.gpu/bin/mmdit bench --model "$models/$name" --device "$DEV" --dtype bf16 --width "$SIZE"
            --height "$SIZE" --steps "$steps" "${args[@]}" --no-reference --compare "$DETAIL/$name-diffusers.json"
            --output-dir "$DETAIL/mmdit-$name")
        if ! sampled "$DETAIL/$name-mmdit-mem.txt" timeout 240 "${bench[@]}" >"$DETAIL/$name.txt" 2>&1; then
            log "$name: mmdit failed ($(grep -m1 error: "$DETAIL/$name.txt" || tail -1 "$DETAIL/$name.txt")); again without cuDNN attention"
            MMDIT_CUDNN_ATTENTION=0 sampled "$DETAIL/$name-mmdit-mem.txt" timeout 240 "${bench[@]}" >"$DETAIL/$name.txt" 2>&1 ||
                log "$name: mmdit failed again ($(tail -1 "$DETAIL/$name.txt"))"
        fi
        sed -n '/ vs /,$p' "$DETAIL/$name.txt" | tee -a "$OUT/summary.txt"
        log "$name: peak GPU memory used (nvidia-smi, whole process): mmdit $(peak_mib "$DETAIL/$name-mmdit-mem.txt") MiB, diffusers $(peak_mib "$DETAIL/$name-diffusers-mem.txt") MiB (torch.cuda.max_memory_allocated $("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])).get("peak_gpu_bytes"); print(b and b>>20)' "$DETAIL/$name-diffusers.json" 2>/dev/null) MiB)"
        log "$name: mmdit done"
        # Where a step's time goes (device synchronised around each phase, so a little slower).
        MMDIT_PROFILE=1 timeout 120 .gpu/bin/mmdit bench --model "$models/$name" --device "$DEV" --dtype bf16 \
            --width "$SIZE" --height "$SIZE" --steps 4 "${args[@]}" --no-reference >"$DETAIL/$name-profile.txt" 2>&1 ||
            log "$name: profile failed"
        sed -n '/^profile/,$p' "$DETAIL/$name-profile.txt" | tee -a "$OUT/summary.txt"
        # The same without cuDNN's fused attention (the blocked attention it replaces), for the
        # attention core's before and after in one run.
        MMDIT_CUDNN_ATTENTION=0 MMDIT_PROFILE=1 timeout 120 .gpu/bin/mmdit bench --model "$models/$name" --device "$DEV" \
            --dtype bf16 --width "$SIZE" --height "$SIZE" --steps 4 "${args[@]}" --no-reference \
            >"$DETAIL/$name-profile-blocked.txt" 2>&1 || log "$name: profile without cuDNN attention failed"
        log "$name without cuDNN attention (MMDIT_CUDNN_ATTENTION=0):"
        sed -n '/^profile/,$p' "$DETAIL/$name-profile-blocked.txt" | tee -a "$OUT/summary.txt"
        pack
        rm -rf "${models:?}/$name"
    done
}

# Tracked paths the parity test and the benchmarks never read.
UNREAD=(tests/fixtures/gguf tests/fixtures/single tests/fixtures/manifests tests/fixtures/fp8
    tests/fixtures/flux2-dev-tiny tests/fixtures/edit tests/fixtures/flux-fill-tiny tests/fixtures/flux-kontext-tiny
    tests/fixtures/demo-bf16 tests/fixtures/flux2-transformer tests/fixtures/lora models/demo docs/cache-bench
    docs/demo-bench)
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)

slim() {
    mkdir -p "$(dirname "$EXCLUDE")"
    unmark
    {
        echo "# gpu_check slim: begin"
        printf '/%s/\n' "${UNREAD[@]}"
        echo "# gpu_check slim: end"
    } >>"$EXCLUDE"
    git rm -r -q --cached --ignore-unmatch "${UNREAD[@]}"
    echo "tracked now: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes; undo with: $0 unslim"
}

unslim() {
    git reset -q -- "${UNREAD[@]}"
    unmark
    git status --short -- "${UNREAD[@]}"
}

# Drops slim's block from the exclude file.
unmark() {
    [ -f "$EXCLUDE" ] || return 0
    sed '/^# gpu_check slim: begin$/,/^# gpu_check slim: end$/d' "$EXCLUDE" >"$EXCLUDE.tmp"
    mv "$EXCLUDE.tmp" "$EXCLUDE"
}

case ${1:-} in
build) build ;;
run) run ;;
slim) slim ;;
unslim) unslim ;;
*) echo "usage: $0 build|run|slim|unslim" >&2; exit 2 ;;
esac
