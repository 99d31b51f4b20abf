//! Activations with CPU kernels: tanh-approximated GELU (diffusers' `gelu-approximate`), CLIP's
//! quick and exact (erf) GELU, and the SiLU-gated product of SwiGLU feed-forwards.

use crate::cpu;
use candle_core::{DType, Result, Tensor};

/// tanh-GELU: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`. bf16 on the CPU is computed in f32
/// and rounded once, as PyTorch does; f32 on the CPU runs a vectorised parallel pass (candle's
/// is a scalar `tanh` per element on one thread); elsewhere candle's op.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        cpu::elementwise::gelu_tanh_bf16(x)
    } else if x.device().is_cpu() && x.dtype() == DType::F32 {
        cpu::elementwise::gelu_tanh_f32(x)
    } else {
        x.gelu()
    }
}

/// CLIP's `quick_gelu`, `x sigmoid(1.702 x)`: on the CPU in f32 and bf16 one vectorised parallel
/// pass with the roundings of transformers' composed ops; elsewhere candle's ops.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && cpu_dtype(x) {
        return cpu::elementwise::quick_gelu(x);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// The exact (erf) GELU, PyTorch's `gelu`: on the CPU in f32 and bf16 vectorised, in f32 and
/// rounded once; elsewhere candle's op.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && cpu_dtype(x) {
        return cpu::elementwise::gelu_erf(x);
    }
    x.gelu_erf()
}

/// `silu(a) * b` (a SwiGLU gate: a language model's `act(gate_proj(x)) * up_proj(x)`). On the CPU in
/// f32 and bf16 one parallel pass, the SiLU computed in f32 and rounded once, as PyTorch's; elsewhere
/// candle's ops.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && cpu_dtype(a) && b.dtype() == a.dtype() && a.shape() == b.shape() {
        return cpu::elementwise::silu_mul(a, b);
    }
    a.silu()? * b
}

/// `silu(x[.., ..h]) * x[.., h..]` over the two halves of the last dim (FLUX.2's SwiGLU); on the CPU
/// as [`silu_mul`], without copying the halves out.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(candle_core::D::Minus1)?;
    if x.device().is_cpu() && cpu_dtype(x) && w % 2 == 0 {
        return cpu::elementwise::swiglu(x);
    }
    let half = w / 2;
    let a = x.narrow(candle_core::D::Minus1, 0, half)?;
    let b = x.narrow(candle_core::D::Minus1, half, half)?;
    a.silu()? * b
}

fn cpu_dtype(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16)
}
