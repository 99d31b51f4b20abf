//! Adaptive layer norms: the conditioning vector sets a per-channel shift, scale and gate
//! (diffusers' `AdaLayerNormZero`, `SD35AdaLayerNormZeroX`, `AdaLayerNormZeroSingle` and
//! `AdaLayerNormContinuous`).

use crate::nn::modulate::{add_gated, norm_modulate};
use crate::nn::{linear_with, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// The LayerNorm epsilon of every MMDiT modulation.
const EPS: f64 = 1e-6;

/// One (shift, scale, gate) triple: a sub-layer `f` runs as `x + gate * f(norm(x) * (1 + scale) +
/// shift)`. Each tensor is (b, dim).
#[derive(Debug, Clone)]
pub struct ModulationOut {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModulationOut {
    /// The sub-layer's input: `layer_norm(x) * (1 + scale) + shift`. x: (b, n, dim)
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        norm_modulate(x, EPS, &self.shift, &self.scale)
    }

    /// The residual update with the sub-layer's output y: `x + gate * y`. x, y: (b, n, dim)
    pub fn gated(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        add_gated(x, y, &self.gate)
    }
}

/// `linear(silu(emb))` cut into (shift, scale, gate) triples, in diffusers' order: one for
/// `AdaLayerNormZeroSingle` (Flux's single blocks), two for `AdaLayerNormZero` (msa, mlp), three for
/// `SD35AdaLayerNormZeroX` (msa, mlp, msa2).
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    triples: usize,
}

impl Modulation {
    pub fn new(dim: usize, triples: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_bias(dim, triples, true, vb)
    }

    /// [`Self::new`] with or without the layer's bias (FLUX.2's shared modulations have none).
    pub fn with_bias(dim: usize, triples: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear: linear_with(dim, 3 * triples * dim, bias, vb.pp("linear"))?,
            triples,
        })
    }

    /// emb: (b, dim) -> the triples, in order.
    pub fn forward(&self, emb: &Tensor) -> Result<Vec<ModulationOut>> {
        let c = self
            .linear
            .forward(&emb.silu()?)?
            .chunk(3 * self.triples, D::Minus1)?;
        Ok(c.chunks_exact(3)
            .map(|t| ModulationOut {
                shift: t[0].clone(),
                scale: t[1].clone(),
                gate: t[2].clone(),
            })
            .collect())
    }
}

/// What `AdaLayerNormZero` (and its MMDiT-X form) gives a joint block's stream.
#[derive(Debug, Clone)]
pub struct BlockModulation {
    /// Around the attention.
    pub msa: ModulationOut,
    /// Around the feed-forward.
    pub mlp: ModulationOut,
    /// Around the second, image-only attention of MMDiT-X layers.
    pub msa2: Option<ModulationOut>,
}

impl Modulation {
    /// The two or three triples of a joint block's stream.
    pub fn forward_block(&self, emb: &Tensor) -> Result<BlockModulation> {
        let mut t = self.forward(emb)?.into_iter();
        match (t.next(), t.next(), t.next()) {
            (Some(msa), Some(mlp), msa2) => Ok(BlockModulation { msa, mlp, msa2 }),
            _ => candle_core::bail!("a block's modulation has {} triples", self.triples),
        }
    }
}

/// Final `AdaLayerNormContinuous` (no affine, eps 1e-6): `norm(x) * (1 + scale) + shift`.
#[derive(Debug, Clone)]
pub struct AdaNormContinuous {
    linear: Linear,
}

impl AdaNormContinuous {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_bias(dim, true, vb)
    }

    /// [`Self::new`] with or without the layer's bias (FLUX.2's has none).
    pub fn with_bias(dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear: linear_with(dim, 2 * dim, bias, vb.pp("linear"))?,
        })
    }

    /// x: (b, n, d); emb: (b, d)
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        // diffusers orders this pair (scale, shift); the original checkpoints store (shift, scale).
        let c = self.linear.forward(&emb.silu()?)?.chunk(2, D::Minus1)?;
        let (scale, shift) = (&c[0], &c[1]);
        norm_modulate(x, EPS, shift, scale)
    }
}
