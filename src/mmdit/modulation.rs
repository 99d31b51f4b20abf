//! Adaptive layer norms: the conditioning vector sets a per-channel shift, scale and gate.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

/// LayerNorm over the last dim without learned affine parameters, computed in f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// `x * (1 + scale) + shift` with per-sample vectors. x: (b, n, d); shift, scale: (b, d)
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
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
            linear: candle_nn::linear(dim, chunks * dim, vb.pp("linear"))?,
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
        modulate(&layer_norm(x, 1e-6)?, &c[1], &c[0])
    }
}
