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
