//! Flux's single-stream block (diffusers `FluxSingleTransformerBlock`): text and image tokens as one
//! sequence; attention and MLP run in parallel from one modulated norm and share one output projection.

use super::attention::QkvProj;
use super::modulation::{Modulation, ModulationOut, StepProduct};
use super::rope::Rope;
use crate::nn::{linear, merge_heads_with, sdpa, Linear};
use crate::profile::{self, Phase};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct SingleBlock {
    /// Absent in Chroma's blocks, which are given their modulation.
    norm: Option<Modulation>,
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
        own_modulation: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mlp = (dim as f64 * mlp_ratio) as usize;
        let names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        Ok(Self {
            norm: match own_modulation {
                true => Some(Modulation::new(dim, 1, vb.pp("norm"))?),
                false => None,
            },
            attn: QkvProj::new(dim, heads, head_dim, true, true, names, &vb.pp("attn"))?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(heads * head_dim + mlp, dim, vb.pp("proj_out"))?,
        })
    }

    /// The block's own modulation layer's product (none for blocks given their modulation).
    pub fn step_product(&self) -> Option<&StepProduct> {
        self.norm.as_ref().map(Modulation::product)
    }

    /// The block's modulation from `temb` (blocks with their own modulation layers).
    pub fn modulation(&self, temb: &Tensor) -> Result<ModulationOut> {
        match &self.norm {
            Some(norm) => Ok(norm.forward(temb)?.remove(0)),
            None => {
                candle_core::bail!("a block without modulation layers was not given its modulation")
            }
        }
    }

    /// x: (b, s + n, dim) joint tokens (text first); temb: (b, dim) -> (b, s + n, dim)
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = profile::phase(Phase::Norms, x.device(), || self.modulation(temb))?;
        self.forward_given(x, &m, rope)
    }

    /// [`Self::forward`] with the modulation given (Chroma's approximator).
    pub fn forward_given(&self, x: &Tensor, m: &ModulationOut, rope: &Rope) -> Result<Tensor> {
        let dev = x.device();
        let h = profile::phase(Phase::Norms, dev, || m.norm(x))?;
        let mlp = profile::phase(Phase::FeedForward, dev, || self.proj_mlp.forward_gelu(&h))?;
        let (q, k, v) = self.attn.forward(&h, Some(rope))?;
        let o = sdpa(&q, &k, &v)?;
        let joined = profile::phase(Phase::Copies, dev, || merge_heads_with(&o, &mlp))?;
        let out = profile::phase(Phase::OutputProjections, dev, || {
            self.proj_out.forward(&joined)
        })?;
        profile::phase(Phase::Norms, dev, || m.gated(x, &out))
    }
}
