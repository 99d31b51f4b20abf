//! Flux's single-stream block (diffusers `FluxSingleTransformerBlock`): text and image tokens as one
//! sequence; attention and MLP run in parallel from one modulated norm and share one output projection.

use super::attention::{merge_heads, sdpa, QkvProj};
use super::modulation::{gate, layer_norm, modulate, Modulation};
use super::rope::Rope;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

#[derive(Debug, Clone)]
pub struct SingleBlock {
    norm: Modulation,
    attn: QkvProj,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl SingleBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        mlp_ratio: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mlp = (dim as f64 * mlp_ratio) as usize;
        let names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        Ok(Self {
            norm: Modulation::new(dim, 3, vb.pp("norm"))?,
            attn: QkvProj::new(dim, heads, head_dim, true, names, &vb.pp("attn"))?,
            proj_mlp: candle_nn::linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: candle_nn::linear(heads * head_dim + mlp, dim, vb.pp("proj_out"))?,
        })
    }

    /// x: (b, s + n, dim) joint tokens (text first); temb: (b, dim) -> (b, s + n, dim)
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        // m: shift, scale, gate
        let m = self.norm.forward(temb)?;
        let h = modulate(&layer_norm(x, 1e-6)?, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&h)?.gelu()?;
        let (q, k, v) = self.attn.forward(&h)?;
        let attn = merge_heads(&sdpa(&rope.apply(&q)?, &rope.apply(&k)?, &v)?)?;
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        x + gate(&out, &m[2])?
    }
}
