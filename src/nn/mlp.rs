//! Two linear layers with an activation between them: diffusers' `FeedForward` (tanh-GELU),
//! `TimestepEmbedding` and `PixArtAlphaTextProjection` (SiLU) share this shape and differ in names.

use super::activation::gelu_tanh;
use super::linear::{linear_with, Linear};
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
        Self::with_bias(dims, act, names, true, vb)
    }

    /// [`Self::new`] with or without the layers' biases.
    pub fn with_bias(
        dims: (usize, usize, usize),
        act: Activation,
        names: [&str; 2],
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (i, h, o) = dims;
        Ok(Self {
            first: linear_with(i, h, bias, vb.pp(names[0]))?,
            second: linear_with(h, o, bias, vb.pp(names[1]))?,
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
        let hidden = match self.act {
            // The GELU folded into the first layer's product where its kernel can.
            Activation::GeluTanh => self.first.forward_gelu(x)?,
            act => act.forward(&self.first.forward(x)?)?,
        };
        self.second.forward(&hidden)
    }
}

/// FLUX.2's feed-forward (diffusers `Flux2FeedForward`): `linear_in` to twice the inner width,
/// `silu(first half) * second half`, `linear_out`; no biases.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    linear_in: Linear,
    linear_out: Linear,
}

impl SwiGlu {
    pub fn new(dim: usize, inner: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_in: linear_with(dim, 2 * inner, false, vb.pp("linear_in"))?,
            linear_out: linear_with(inner, dim, false, vb.pp("linear_out"))?,
        })
    }

    /// `silu(x[..half]) * x[half..]` over the last dim ([`super::activation::swiglu`]).
    pub fn gate(x: &Tensor) -> Result<Tensor> {
        super::activation::swiglu(x)
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_out
            .forward(&Self::gate(&self.linear_in.forward(x)?)?)
    }
}

/// A transformer block's feed-forward: diffusers' `FeedForward` (tanh-GELU, FLUX.1 and SD3) or
/// FLUX.2's SwiGLU.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Gelu(Mlp),
    SwiGlu(SwiGlu),
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Gelu(m) => m.forward(x),
            FeedForward::SwiGlu(m) => m.forward(x),
        }
    }
}
