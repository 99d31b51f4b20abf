//! Input embeddings: patches of the latent image, the timestep and the pooled text vector.

use crate::nn::modulate::add_over_batch;
use crate::nn::{linear, Linear, Mlp, RmsNorm};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding` with `flip_sin_to_cos=True`,
/// `downscale_freq_shift=0`: `[cos(t f_k), sin(t f_k)]`, `f_k = exp(-ln(10000) k / half)`.
///
/// The frequencies are rounded as torch rounds them (`-ln(10000) * k` in f32, then `/ half` in
/// f32, then `exp`), so that large arguments (Chroma's modulation index x 1000, up to ~3e5) land
/// on the same f32 values.
///
/// # Shapes
/// t: (b,) -> (b, dim), always f32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| {
            let e = (-(10000f64.ln()) as f32 * k as f32) / half as f32;
            (e as f64).exp() as f32
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, half, t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?; // (b, half)
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `CombinedTimestepTextProjEmbeddings` (and, with a guidance embedder, Flux-dev's
/// `CombinedTimestepGuidanceTextProjEmbeddings`): timestep [+ guidance] + pooled-text embedding.
#[derive(Debug, Clone)]
pub struct TimeTextEmbed {
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
}

/// Width of the sinusoidal timestep features.
const TIME_FEATURES: usize = 256;

impl TimeTextEmbed {
    pub fn new(hidden: usize, pooled_dim: usize, guidance: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: Mlp::embedding(TIME_FEATURES, hidden, vb.pp("timestep_embedder"))?,
            guidance_embedder: if guidance {
                Some(Mlp::embedding(
                    TIME_FEATURES,
                    hidden,
                    vb.pp("guidance_embedder"),
                )?)
            } else {
                None
            },
            text_embedder: Mlp::embedding(pooled_dim, hidden, vb.pp("text_embedder"))?,
        })
    }

    /// t: (b,) timesteps in [0, 1000]; guidance: (b,) scale x 1000 (models with a guidance embedder);
    /// pooled: (b, pooled_dim) -> (b, hidden)
    pub fn forward(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let embed = |x: &Tensor, m: &Mlp| {
            m.forward(&timestep_embedding(x, TIME_FEATURES)?.to_dtype(pooled.dtype())?)
        };
        let mut temb = embed(t, &self.timestep_embedder)?;
        if let (Some(g), Some(m)) = (guidance, &self.guidance_embedder) {
            temb = (temb + embed(g, m)?)?;
        }
        temb + self.text_embedder.forward(pooled)?
    }
}

/// `PatchEmbed` with `pos_embed_max_size`: a strided conv over patches (done as one matrix product over
/// flattened patches, same weights) plus a centred crop of the square sin-cos position table.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// The conv kernel flattened in (c, p, p) order, as a linear layer (c * p * p -> hidden).
    proj: Linear,
    /// (1, m*m, hidden)
    pos_embed: Tensor,
    patch: usize,
    max_size: usize,
}

impl PatchEmbed {
    pub fn new(
        in_ch: usize,
        hidden: usize,
        patch: usize,
        max_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let p = vb.pp("proj");
        let weight = p
            .get((hidden, in_ch, patch, patch), "weight")?
            .reshape((hidden, in_ch * patch * patch))?;
        let bias = p.get(hidden, "bias")?;
        let proj = Linear::new(candle_nn::Linear::new(weight, Some(bias)))?;
        let pos_embed = vb.get((1, max_size * max_size, hidden), "pos_embed")?;
        Ok(Self {
            proj,
            pos_embed,
            patch,
            max_size,
        })
    }

    /// Largest latent side (in latent pixels) the position table covers.
    pub fn max_latent_side(&self) -> usize {
        self.max_size * self.patch
    }

    /// x: (b, c, h, w) latents -> (b, h/p * w/p, hidden) tokens, row-major over patches.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (hp, wp) = (h / p, w / p);
        if hp > self.max_size || wp > self.max_size {
            candle_core::bail!(
                "latent grid {hp}x{wp} patches exceeds the position table ({m}x{m})",
                m = self.max_size
            );
        }
        let patches = x
            .reshape((b, c, hp, p, wp, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (b, hp, wp, c, p, p)
            .reshape((b, hp * wp, c * p * p))?;
        let x = self.proj.forward(&patches)?; // (b, hp*wp, hidden)
        let hidden = self.pos_embed.dim(2)?;
        let top = (self.max_size - hp) / 2;
        let left = (self.max_size - wp) / 2;
        let pos = self
            .pos_embed
            .reshape((1, self.max_size, self.max_size, hidden))?
            .narrow(1, top, hp)?
            .narrow(2, left, wp)?
            .reshape((1, hp * wp, hidden))? // (1, hp*wp, hidden)
            .to_dtype(x.dtype())?;
        add_over_batch(&x, &pos)
    }
}

/// Chroma's `distilled_guidance_layer` (diffusers `ChromaApproximator`) with its input
/// (`ChromaCombinedTimestepTextProjEmbeddings`): every modulation of the model, computed from the
/// timestep alone. Row `i` of the input is `[emb(t), emb(0), emb(1000 i)]` (the middle one is the
/// guidance feature, always 0); an input projection, `layers` residual SiLU MLPs on RMS-normed
/// input, and an output projection give row `i`'s modulation vector.
#[derive(Debug, Clone)]
pub struct Approximator {
    in_proj: Linear,
    layers: Vec<(RmsNorm, Mlp)>,
    out_proj: Linear,
    /// (rows, channels / 2): the index features, the same for every step.
    index: Tensor,
    channels: usize,
}

impl Approximator {
    /// `channels` input features, `rows` modulation vectors of width `out`.
    pub fn new(
        channels: usize,
        hidden: usize,
        out: usize,
        layers: usize,
        rows: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // diffusers builds `nn.RMSNorm(hidden)` without eps: torch then uses the f32 epsilon.
        let eps = f32::EPSILON as f64;
        let layers = (0..layers)
            .map(|i| {
                Ok((
                    RmsNorm::new(hidden, eps, vb.pp(format!("norms.{i}")))?,
                    Mlp::embedding(hidden, hidden, vb.pp(format!("layers.{i}")))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<f32> = (0..rows).map(|i| (i * 1000) as f32).collect();
        let index = timestep_embedding(&Tensor::from_vec(ids, rows, vb.device())?, channels / 2)?;
        Ok(Self {
            in_proj: linear(channels, hidden, vb.pp("in_proj"))?,
            layers,
            out_proj: linear(hidden, out, vb.pp("out_proj"))?,
            index,
            channels,
        })
    }

    /// t: (b,) timesteps in [0, 1000] -> (b, rows, out) in `dtype`.
    pub fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let b = t.dim(0)?;
        let rows = self.index.dim(0)?;
        let quarter = self.channels / 4;
        let time = timestep_embedding(t, quarter)?; // (b, c/4)
        let guidance = timestep_embedding(&Tensor::zeros(b, DType::F32, t.device())?, quarter)?;
        let both = Tensor::cat(&[time, guidance], D::Minus1)?
            .unsqueeze(1)?
            .broadcast_as((b, rows, 2 * quarter))?;
        let index = self
            .index
            .unsqueeze(0)?
            .broadcast_as((b, rows, self.channels / 2))?;
        let input = Tensor::cat(&[both, index], D::Minus1)?.to_dtype(dtype)?;
        let mut x = self.in_proj.forward(&input)?;
        for (norm, mlp) in &self.layers {
            x = (&x + mlp.forward(&norm.forward(&x)?)?)?;
        }
        self.out_proj.forward(&x)
    }
}
