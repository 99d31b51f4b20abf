//! Adaptive layer norms: the conditioning vector sets a per-channel shift, scale and gate.

use super::linear::{linear, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dim without learned affine parameters, computed in f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// `modulate(layer_norm(x), shift, scale)`. On a GPU one fused kernel per sample (statistics in f32,
/// `1 + scale` and `shift` as the norm's affine parameters); on the CPU the composed f32 path, or in
/// bf16 one vectorised pass with the composed path's roundings ([`crate::cpu::norm_modulate_bf16`]).
///
/// # Shapes
/// x: (b, n, d); shift, scale: (b, d) -> (b, n, d)
pub fn norm_modulate(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        return crate::cpu::norm_modulate_bf16(x, eps, shift, scale);
    }
    if x.device().is_cpu() {
        return modulate(&layer_norm(x, eps)?, shift, scale);
    }
    norm_modulate_fused(x, eps, shift, scale)
}

/// The fused path of [`norm_modulate`] (any device; tested against the composed one on the CPU).
pub(crate) fn norm_modulate_fused(
    x: &Tensor,
    eps: f64,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let alpha = (scale.to_dtype(dtype)? + 1.0)?;
    let beta = shift.to_dtype(dtype)?;
    let x = x.contiguous()?;
    let rows = (0..x.dim(0)?)
        .map(|i| {
            candle_nn::ops::layer_norm(
                &x.get(i)?,
                &alpha.get(i)?.contiguous()?,
                &beta.get(i)?.contiguous()?,
                eps as f32,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// `x * (1 + scale) + shift` with per-sample vectors. x: (b, n, d); shift, scale: (b, d)
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `x + gate * y` with a per-sample gate (the gated residual update); bf16 on the CPU in one pass.
/// x, y: (b, n, d); gate: (b, d)
pub fn add_gated(x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 && y.dtype() == DType::BF16 {
        return crate::cpu::add_gated_bf16(x, y, g);
    }
    x + gate(y, g)?
}

/// `gate * x` with a per-sample gate. x: (b, n, d); gate: (b, d)
pub fn gate(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&gate.unsqueeze(1)?)
}

/// `linear(silu(emb))` split into `n` equal chunks: the modulation of diffusers' `AdaLayerNormZero`
/// (6 chunks), `SD35AdaLayerNormZeroX` (9) and `AdaLayerNormContinuous` (2, scale first).
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    chunks: usize,
}

impl Modulation {
    pub fn new(dim: usize, chunks: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear: linear(dim, chunks * dim, vb.pp("linear"))?,
            chunks,
        })
    }

    /// emb: (b, dim) -> `chunks` tensors of (b, dim)
    pub fn forward(&self, emb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear
            .forward(&emb.silu()?)?
            .chunk(self.chunks, D::Minus1)
    }
}

/// Final `AdaLayerNormContinuous` (no affine, eps 1e-6): `norm(x) * (1 + scale) + shift`.
#[derive(Debug, Clone)]
pub struct AdaNormContinuous {
    m: Modulation,
}

impl AdaNormContinuous {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            m: Modulation::new(dim, 2, vb)?,
        })
    }

    /// x: (b, n, d); emb: (b, d)
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let c = self.m.forward(emb)?;
        // diffusers orders this pair (scale, shift); the original checkpoints store (shift, scale).
        norm_modulate(x, 1e-6, &c[1], &c[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_norm_modulate_equals_the_composed_path() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 48), &dev)
            .unwrap()
            .affine(3.0, 0.5)
            .unwrap();
        let shift = Tensor::randn(0f32, 1.0, (2, 48), &dev).unwrap();
        let scale = Tensor::randn(0f32, 1.0, (2, 48), &dev).unwrap();
        let a = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
        let b = norm_modulate_fused(&x, 1e-6, &shift, &scale).unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
