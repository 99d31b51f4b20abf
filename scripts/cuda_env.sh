# Sets up a CUDA 13.0 toolchain from the Python package registry, so that `cargo build --features cuda`
# compiles and links on a machine without a GPU or a system CUDA. Source it from the repository root:
#
#     source scripts/cuda_env.sh && cargo build --release --features cuda
#
# What it does (see README "Backends"):
# - a virtual environment .cuda-env (or $CUDA_ENV_DIR) with nvcc, the CUDA headers and the libraries that
#   the binary links (cuBLAS, cuRAND, NVRTC, the runtime, cuDNN 9), pinned to CUDA 13.0: cudarc 0.19
#   refuses newer toolkits, and driver 580 (CUDA 13.0) cannot load PTX from a newer one; and the
#   cuDNN frontend's headers (build.rs finds them there);
# - a folder of unversioned library names (the wheels ship only libcublas.so.13 and the like), handed to
#   the linker through LIBRARY_PATH (which leaves cargo's fingerprints, and so other builds, alone);
# - a stub libcuda.so (soname libcuda.so.1) defining every driver function cudarc declares, each returning
#   CUDA_ERROR_NO_DEVICE. libcuda belongs to the driver and is in no registry; at run time the driver's
#   own libcuda.so.1 is loaded instead, and without one `--device cuda` fails with a clean error.
# - CUDA_COMPUTE_CAP=90 (Hopper) unless already set: candle compiles its kernels for that target.

CUDA_ENV_DIR=${CUDA_ENV_DIR:-$PWD/.cuda-env}
_mmdit_cuda_setup() {
    local py=${PYTHON:-python3}
    if [ ! -x "$CUDA_ENV_DIR/bin/python" ]; then
        "$py" -m venv "$CUDA_ENV_DIR" || return 1
    fi
    if ! "$CUDA_ENV_DIR/bin/python" -c 'import nvidia, os, sys; p = nvidia.__path__[0]; sys.exit(not (os.path.exists(os.path.join(p, "cu13", "bin", "nvcc")) and os.path.exists(os.path.join(p, "cudnn", "lib", "libcudnn.so.9"))))' 2>/dev/null; then
        "$CUDA_ENV_DIR/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 \
            nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
            nvidia-cudnn-cu13==9.26.0.51 || return 1
    fi
    # The cuDNN frontend's C++ headers (src/cuda/sdpa.cpp); its wheel's Python dependencies are
    # for its Python side, not wanted here.
    if ! "$CUDA_ENV_DIR/bin/python" -c 'import nvidia, os, sys; sys.exit(not os.path.exists(os.path.join(os.path.dirname(nvidia.__path__[0]), "include", "cudnn_frontend.h")))' 2>/dev/null; then
        "$CUDA_ENV_DIR/bin/pip" install -q --no-deps nvidia-cudnn-frontend==1.32.0 || return 1
    fi
    CUDA_ROOT=$("$CUDA_ENV_DIR/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))') || return 1
    local cudnn_lib
    cudnn_lib=$(dirname "$CUDA_ROOT")/cudnn/lib
    export CUDA_ROOT CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT
    export PATH=$CUDA_ROOT/bin:$PATH
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

    local links=$CUDA_ENV_DIR/link
    mkdir -p "$links"
    local lib
    for lib in "$CUDA_ROOT"/lib/lib*.so.* "$cudnn_lib"/libcudnn.so.*; do
        [ -e "$lib" ] || continue
        local base
        base=$(basename "$lib")
        ln -sf "$lib" "$links/${base%%.so.*}.so"
    done
    if [ ! -e "$links/libcuda.so" ]; then
        (cargo fetch -q >/dev/null 2>&1 || true)
        local cudarc
        cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)
        if [ -z "$cudarc" ]; then
            echo "cuda_env.sh: cudarc sources not found; run cargo fetch first" >&2
            return 1
        fi
        grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
            awk '{print "int " $1 "(void) { return 100; }"}' >"$links/cuda_stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c" || return 1
        ln -sf libcuda.so "$links/libcuda.so.1"
    fi
    export LIBRARY_PATH=$links${LIBRARY_PATH:+:$LIBRARY_PATH}
    # For running a CUDA build on this machine without a driver (the stub answers "no device"):
    # LD_LIBRARY_PATH=$CUDA_STUB_LIBRARY_PATH. Not for a GPU machine: there the driver's libcuda is used.
    export CUDA_STUB_LIBRARY_PATH=$links:$CUDA_ROOT/lib:$cudnn_lib
}
_mmdit_cuda_setup
