//! Helpers shared by the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

pub fn meta(name: &str) -> serde_json::Value {
    let s = std::fs::read_to_string(fixture(name).join("fixture.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

/// max |a - b| and max |b|, both as f32.
pub fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d: f32 = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let m: f32 = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    (d, m)
}

/// Asserts max |a - b| <= rel * max |b| and prints the measured error.
pub fn assert_close_rel(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let (d, m) = max_diff(a, b);
    println!(
        "{what}: max abs diff {d:.3e}, max |ref| {m:.3e}, ratio {:.3e} (tolerance {rel:.0e})",
        d / m.max(1e-30)
    );
    assert!(d <= rel * m, "{what}: max abs diff {d} exceeds {rel} x {m}");
}

/// A fresh, empty temporary folder for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmdit-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a fixture model folder into a temporary folder, to be damaged by a test.
pub fn copy_fixture(name: &str, test: &str) -> PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), t).unwrap();
            }
        }
    }
    let dst = tmp(test).join(name);
    copy(&fixture(name), &dst);
    dst
}

/// The `mmdit` binary.
pub fn mmdit() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mmdit"))
}

/// Runs the binary and returns (exit code, stderr).
pub fn run(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let o = mmdit().args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts a failed run: non-zero exit, a one-line `error:` message containing every `needle`,
/// no panic or backtrace.
pub fn assert_clean_error(code: Option<i32>, stderr: &str, needles: &[&str]) {
    assert!(
        matches!(code, Some(c) if c != 0),
        "expected failure, got {code:?}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}
