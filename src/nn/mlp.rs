//! Two linear layers with an activation between them: diffusers' `FeedForward` (tanh-GELU),
//! `TimestepEmbedding` and `PixArtAlphaTextProjection` (SiLU) share this shape and differ in names.

use super::activation::gelu_tanh;
use super::linear::{linear, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The activation between the two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// diffusers' `gelu-approximate`.
    GeluTanh,
    Silu,
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh => gelu_tanh(x),
            Activation::Silu => x.silu(),
        }
    }
}

/// `second(act(first(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    first: Linear,
    second: Linear,
    act: Activation,
}

impl Mlp {
    /// `dims` = (in, hidden, out); `names` = the two layers' names under `vb`.
    pub fn new(
        dims: (usize, usize, usize),
        act: Activation,
        names: [&str; 2],
        vb: VarBuilder,
    ) -> Result<Self> {
        let (i, h, o) = dims;
        Ok(Self {
            first: linear(i, h, vb.pp(names[0]))?,
            second: linear(h, o, vb.pp(names[1]))?,
            act,
        })
    }

    /// diffusers' `FeedForward(dim, inner, activation_fn="gelu-approximate")`: `net.0.proj` ->
    /// tanh-GELU -> `net.2`.
    pub fn feed_forward(dim: usize, inner: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(
            (dim, inner, dim),
            Activation::GeluTanh,
            ["net.0.proj", "net.2"],
            vb,
        )
    }

    /// diffusers' `TimestepEmbedding` / `PixArtAlphaTextProjection(act_fn="silu")`: `linear_1` ->
    /// SiLU -> `linear_2`, both to `hidden`.
    pub fn embedding(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(
            (in_dim, hidden, hidden),
            Activation::Silu,
            ["linear_1", "linear_2"],
            vb,
        )
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.second
            .forward(&self.act.forward(&self.first.forward(x)?)?)
    }
}
