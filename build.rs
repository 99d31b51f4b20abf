//! With the `cuda` feature: builds `src/cuda/sdpa.cpp`, cuDNN's fused attention through the cuDNN
//! frontend's header-only graph API, and links cuDNN, the CUDA runtime and NVRTC (which the
//! frontend calls). Without the feature: nothing.
//!
//! The headers are found from the variables `scripts/cuda_env.sh` sets (the Python package
//! registry's layout: `<site-packages>/nvidia/cu13`, `nvidia/cudnn/include`, `include/`), or
//! given as `CUDNN_FRONTEND_INCLUDE` and `CUDNN_INCLUDE`.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/sdpa.cpp");
    for var in [
        "CUDNN_FRONTEND_INCLUDE",
        "CUDNN_INCLUDE",
        "CUDA_ROOT",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cuda = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")])
        .find(|root| root.join("include/cuda_runtime_api.h").exists())
        .unwrap_or_else(|| {
            fail("the CUDA headers (cuda_runtime_api.h) were not found: set CUDA_ROOT, or `source scripts/cuda_env.sh`")
        });
    // In the registry's layout the CUDA root is <site-packages>/nvidia/cu13.
    let nvidia = cuda.parent().map(Path::to_path_buf).unwrap_or_default();
    let site_packages = nvidia.parent().map(Path::to_path_buf).unwrap_or_default();
    let cudnn = include_dir(
        "CUDNN_INCLUDE",
        "cudnn.h",
        [nvidia.join("cudnn/include"), cuda.join("include")],
    );
    let frontend = include_dir(
        "CUDNN_FRONTEND_INCLUDE",
        "cudnn_frontend.h",
        [site_packages.join("include"), cuda.join("include")],
    );
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/cuda/sdpa.cpp")
        .define("CUDNN_FRONTEND_SKIP_JSON_LIB", None)
        // Their own warnings are not ours to fix: included as system headers.
        .flag("-isystem")
        .flag(frontend.to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(cudnn.to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(cuda.join("include").to_string_lossy().as_ref())
        .compile("mmdit_cudnn_sdpa");
    for lib in ["cudnn", "cudart", "nvrtc"] {
        println!("cargo::rustc-link-lib=dylib={lib}");
    }
}

/// The folder holding `header`: `$var` if set, else the first candidate that has it, else the
/// system's include folders.
fn include_dir(var: &str, header: &str, candidates: [PathBuf; 2]) -> PathBuf {
    if let Some(dir) = env::var_os(var).map(PathBuf::from) {
        if dir.join(header).exists() {
            return dir;
        }
        fail(&format!(
            "{var}={} has no {header}; point it at the folder that has",
            dir.display()
        ));
    }
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/include"), PathBuf::from("/usr/local/include")])
        .find(|dir| dir.join(header).exists())
        .unwrap_or_else(|| {
            fail(&format!(
                "{header} not found: set {var} to its folder, or `source scripts/cuda_env.sh` (it installs cuDNN and the cuDNN frontend from the Python package registry)"
            ))
        })
}

fn fail(what: &str) -> ! {
    eprintln!("mmdit's cuda feature: {what}");
    std::process::exit(1)
}
