//! `AutoencoderKL` (diffusers names), the same class for SD3 and Flux: the decoder turns latents into
//! pixels, the encoder pixels into the latent distribution that editing starts from.

mod blocks;
mod decoder;
mod encoder;
mod tiling;

pub use decoder::VaeDecoder;
pub use encoder::{LatentDist, VaeEncoder};
pub use tiling::Tiles;

use candle_core::{Result, Tensor};

/// diffusers' postprocess: `(x / 2 + 0.5).clamp(0, 1)`, `* 255`, round half to even, to u8.
/// x: (b, 3, h, w) -> one (h, w, 3) RGB buffer per image.
pub fn to_rgb8(x: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let (b, _, h, w) = x.dims4()?;
    let x = ((x.to_dtype(candle_core::DType::F32)? * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.permute((0, 2, 3, 1))?.contiguous()?; // (b, h, w, 3)
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v: Vec<f32> = x.get(i)?.flatten_all()?.to_vec1()?;
        out.push((
            h,
            w,
            v.into_iter().map(|p| p.round_ties_even() as u8).collect(),
        ));
    }
    Ok(out)
}

/// diffusers' preprocess of an 8-bit image: `x / 255 * 2 - 1` in f32, as (1, 3, h, w).
pub fn from_rgb8(img: &crate::output::RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = img
        .data
        .iter()
        .map(|&p| 2.0 * (f32::from(p) / 255.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (1, img.height, img.width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `AutoencoderKLFlux2`'s normalisation of the sampler's latents: p x p patches of the VAE's
/// latents (`_patchify_latents`), standardised by the VAE's batch-norm running statistics.
#[derive(Debug, Clone)]
pub struct PatchNorm {
    /// (1, C p², 1, 1) each, f32.
    mean: Tensor,
    std: Tensor,
    patch: usize,
}

impl PatchNorm {
    /// The statistics under `bn.` of the VAE's weights, for `cfg`'s patch size; `None` for a VAE
    /// without patches.
    pub fn new(cfg: &crate::config::VaeConfig, vb: &candle_nn::VarBuilder) -> Result<Option<Self>> {
        if cfg.patch_size.is_none() {
            return Ok(None);
        }
        let c = cfg.sampler_channels();
        let get = |n: &str| -> Result<Tensor> {
            vb.pp("bn")
                .get(c, n)?
                .to_dtype(candle_core::DType::F32)?
                .reshape((1, c, 1, 1))
        };
        let std = (get("running_var")? + cfg.batch_norm_eps)?.sqrt()?;
        Ok(Some(Self {
            mean: get("running_mean")?,
            std,
            patch: cfg.patch(),
        }))
    }

    /// VAE latents (b, C, H, W) -> sampler latents (b, C p², H / p, W / p): channel-major inside
    /// each patch, then standardised.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let p = self.patch;
        let x = z
            .reshape((b, c, h / p, p, w / p, p))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((b, c * p * p, h / p, w / p))?;
        x.broadcast_sub(&self.mean.to_dtype(x.dtype())?)?
            .broadcast_div(&self.std.to_dtype(x.dtype())?)
    }

    /// The inverse of [`Self::forward`].
    pub fn inverse(&self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .broadcast_mul(&self.std.to_dtype(x.dtype())?)?
            .broadcast_add(&self.mean.to_dtype(x.dtype())?)?;
        let (b, cp, h, w) = x.dims4()?;
        let p = self.patch;
        let c = cp / (p * p);
        x.reshape((b, c, p, p, h, w))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, c, h * p, w * p))
    }
}
