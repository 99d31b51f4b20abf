//! `AutoencoderKL` (diffusers names), the same class for SD3 and Flux: the decoder turns latents into
//! pixels, the encoder pixels into the latent distribution that editing starts from.

mod blocks;
mod decoder;
mod encoder;

pub use decoder::VaeDecoder;
pub use encoder::{LatentDist, VaeEncoder};

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
