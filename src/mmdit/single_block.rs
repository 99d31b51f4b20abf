//! Flux's single-stream block (diffusers `FluxSingleTransformerBlock`): text and image tokens as one
//! sequence; attention and MLP run in parallel from one modulated norm and share one output projection.

use super::attention::{merge_heads, sdpa, QkvProj};
use super::linear::{linear, Linear};
use super::modulation::{add_gated, norm_modulate, Modulation};
use super::rope::Rope;
use crate::profile;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

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
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(heads * head_dim + mlp, dim, vb.pp("proj_out"))?,
        })
    }

    /// x: (b, s + n, dim) joint tokens (text first); temb: (b, dim) -> (b, s + n, dim)
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        // m: shift, scale, gate
        let dev = x.device();
        let norms = "norms, modulation, gates, residuals";
        let (m, h) = profile::phase(norms, dev, || {
            let m = self.norm.forward(temb)?;
            let h = norm_modulate(x, 1e-6, &m[0], &m[1])?;
            Ok((m, h))
        })?;
        let mlp = profile::phase("feed-forward", dev, || {
            super::joint_block::gelu_tanh(&self.proj_mlp.forward(&h)?)
        })?;
        let (q, k, v) = self.attn.forward(&h)?;
        let (q, k) = profile::phase("RoPE", dev, || Ok((rope.apply(&q)?, rope.apply(&k)?)))?;
        let o = sdpa(&q, &k, &v)?;
        let joined = profile::phase("copies (heads, joins, splits)", dev, || {
            Tensor::cat(&[merge_heads(&o)?, mlp], D::Minus1)
        })?;
        let out = profile::phase("output projections", dev, || self.proj_out.forward(&joined))?;
        profile::phase(norms, dev, || add_gated(x, &out, &m[2]))
    }
}
