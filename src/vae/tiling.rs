//! Tiled VAE passes as diffusers' `enable_tiling()` runs them (`AutoencoderKL.tiled_decode`,
//! `_tiled_encode`, the same in `AutoencoderKLFlux2`): the input cut into overlapping square tiles,
//! each run on its own (so memory follows the tile, not the image), each output tile blended
//! linearly into the one above and the one to its left over a band, then cropped and joined.

use candle_core::{Result, Tensor};

/// The tile sizes of a VAE with `sample_size` pixels per tile and `levels` resolution levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    /// `tile_sample_min_size`: a tile's side in pixels.
    pub sample: usize,
    /// `tile_latent_min_size`: a tile's side in latents.
    pub latent: usize,
}

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

impl Tiles {
    pub fn new(sample_size: usize, levels: usize) -> Self {
        let f = 1usize << levels.saturating_sub(1).min(16);
        Self {
            sample: sample_size,
            latent: (sample_size / f).max(1),
        }
    }

    /// Whether decoding latents of (h, w) is tiled: either side beyond a tile.
    pub fn decodes_tiled(&self, h: usize, w: usize) -> bool {
        h > self.latent || w > self.latent
    }

    /// Whether encoding pixels of (h, w) is tiled.
    pub fn encodes_tiled(&self, h: usize, w: usize) -> bool {
        h > self.sample || w > self.sample
    }

    /// `tiled_decode`: `latent`-sided tiles every `latent * 0.75`, blended over a quarter of a
    /// pixel tile, each cropped to the rest.
    pub fn decode(&self, z: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let blend = (self.sample as f64 * OVERLAP) as usize;
        let stride = ((self.latent as f64 * (1.0 - OVERLAP)) as usize).max(1);
        tiled(z, self.latent, stride, blend, self.sample - blend, f)
    }

    /// `_tiled_encode`: `sample`-sided tiles every `sample * 0.75`, blended over a quarter of a
    /// latent tile.
    pub fn encode(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let blend = (self.latent as f64 * OVERLAP) as usize;
        let stride = ((self.sample as f64 * (1.0 - OVERLAP)) as usize).max(1);
        tiled(x, self.sample, stride, blend, self.latent - blend, f)
    }
}

/// `x` (b, c, H, W) cut into `tile`-sided tiles starting every `stride`, each through `f`; each
/// output tile blended with the (already blended) one above and then the one to its left over
/// `blend` rows / columns, cropped to `limit` x `limit` and joined.
fn tiled(
    x: &Tensor,
    tile: usize,
    stride: usize,
    blend: usize,
    limit: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?
                .contiguous()?;
            row.push(f(&t)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut out_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend_edge(&rows[i - 1][j], &t, blend, 2)?;
            }
            if j > 0 {
                t = blend_edge(&rows[i][j - 1], &t, blend, 3)?;
            }
            // diffusers blends in place: the tiles below and to the right see this one blended.
            rows[i][j] = t.clone();
            let (th, tw) = (t.dim(2)?.min(limit), t.dim(3)?.min(limit));
            out_row.push(t.narrow(2, 0, th)?.narrow(3, 0, tw)?);
        }
        out_rows.push(Tensor::cat(&out_row, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

/// `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` lines of `b` become
/// `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`.
fn blend_edge(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let n = b.dim(dim)?;
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    // As torch: each weight a Python float, rounded to the tensor's dtype.
    let up: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let down: Vec<f32> = (0..extent)
        .map(|y| (1.0 - y as f64 / extent as f64) as f32)
        .collect();
    let dev = b.device();
    let up = Tensor::from_vec(up, shape.as_slice(), dev)?.to_dtype(b.dtype())?;
    let down = Tensor::from_vec(down, shape.as_slice(), dev)?.to_dtype(b.dtype())?;
    let a_end = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let mixed = (a_end.broadcast_mul(&down)? + b.narrow(dim, 0, extent)?.broadcast_mul(&up)?)?;
    match n > extent {
        true => Tensor::cat(&[&mixed, &b.narrow(dim, extent, n - extent)?], dim),
        false => Ok(mixed),
    }
}
