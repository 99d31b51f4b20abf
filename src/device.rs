//! Device and dtype selection from user strings, with errors that name the cargo feature to enable.

use crate::error::{Error, Message, Param, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (CUDA, then Metal, then CPU).
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let not_built = |name: &str, feature: &str| {
        Error::Device(Message::about(Param::Device).text(format!(
            " {name}: this mmdit was built without {name} support; rebuild with `cargo build --release --features {feature}`"
        )))
    };
    // "<device> <s>: <problem>; <fix>, or use <device> cpu"
    let unusable = |problem: String| {
        Error::Device(
            Message::about(Param::Device)
                .text(format!(" {s}: {problem}; use "))
                .param(Param::Device)
                .text(" cpu"),
        )
    };
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = new_cuda(0) {
                    return Ok(d);
                }
            }
            if cfg!(feature = "metal") {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(not_built("metal", "metal"));
            }
            Device::new_metal(0).map_err(|e| unusable(e.to_string()))
        }
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let idx = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::invalid(
                        Param::Device,
                        format!(" {s}: expected cuda:N with N a GPU index, e.g. cuda:0"),
                    )
                })?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                return Err(not_built("cuda", "cuda"));
            }
            new_cuda(idx)
                .map_err(|e| unusable(format!("no usable CUDA GPU ({e}); check the driver")))
        }
        _ => Err(Error::invalid(
            Param::Device,
            format!(" {s}: unknown device; use cpu, cuda, cuda:N, metal or auto"),
        )),
    }
}

/// CUDA device `idx`, f32 kept f32: cuDNN (the convolutions) would otherwise run f32 on TF32
/// tensor cores on Ampere and later (10-bit mantissas: about 1e-3 relative error, ten times the
/// f32 parity tolerance); `NVIDIA_TF32_OVERRIDE=0` turns that off in every CUDA library, and leaves
/// bf16 and f16 alone. A value the user set is kept.
fn new_cuda(idx: usize) -> candle_core::Result<Device> {
    const TF32: &str = "NVIDIA_TF32_OVERRIDE";
    if std::env::var_os(TF32).is_none() {
        // Set before the device, and so any CUDA library, exists; the CLI and the server parse
        // their device before starting work on other threads.
        std::env::set_var(TF32, "0");
    }
    Device::new_cuda(idx)
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::invalid(
            Param::Dtype,
            format!(" {other}: unknown dtype; use f32, f16 or bf16"),
        )),
    }
}

/// The default dtype of a device: bf16 on CUDA and Metal (f16 overflows in T5 and in Flux's
/// activations), f32 on the CPU. The VAE and T5 move to f32 where their dtype is unsafe
/// (`pipeline::vae_dtype`, `pipeline::t5_dtype`).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() || device.is_metal() {
        DType::BF16
    } else {
        DType::F32
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}
