//! Activations with CPU kernels: tanh-approximated GELU (diffusers' `gelu-approximate`).

use crate::cpu;
use candle_core::{DType, Result, Tensor};

/// tanh-GELU: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`. bf16 on the CPU is computed in f32
/// and rounded once, as PyTorch does; f32 on the CPU runs a vectorised kernel where the feature
/// switch allows AVX-512; elsewhere candle's op.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        cpu::elementwise::gelu_tanh_bf16(x)
    } else if x.device().is_cpu() && x.dtype() == DType::F32 && cpu::features().avx512 {
        cpu::elementwise::gelu_tanh_f32(x)
    } else {
        x.gelu()
    }
}
