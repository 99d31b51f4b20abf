//! Previews: what a step's prediction of the final latents will look like, from the latents alone
//! (no VAE), cheap enough for every step. Each latent pixel maps linearly to the mean colour of the
//! f x f pixels it decodes to. The map is fitted for the loaded model's own VAE, by least squares on
//! smooth random latents and their decoded images, so it holds for every family and checkpoint
//! without a table of constants.

use super::Pipeline;
use crate::error::Result;
use crate::output::RgbImage;
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

/// Latents decoded for the fit, and their side in latent pixels.
const SAMPLES: usize = 8;
const SIDE: usize = 16;

/// A latent-to-RGB map: per output channel, weights over [`features`] of a latent pixel (its
/// channels, their pairwise products and 1).
#[derive(Debug, Clone)]
pub struct Preview {
    channels: usize,
    /// rgb[k] = Σ_i w[k][i] features(z)_i, in 0..255.
    w: [Vec<f64>; 3],
}

/// A latent pixel's features: its C values, the C(C+1)/2 products of pairs (decoders are far
/// from linear on saturated colours), and 1.
fn features(z: &[f64], out: &mut Vec<f64>) {
    out.clear();
    out.extend_from_slice(z);
    for i in 0..z.len() {
        for j in i..z.len() {
            out.push(z[i] * z[j]);
        }
    }
    out.push(1.0);
}

impl Preview {
    /// The map fitted for `pipe`'s VAE. [`SAMPLES`] smooth random colour fields of [`SIDE`]²
    /// latent pixels are encoded by the VAE (its distribution's mean, in sampler space, so the
    /// latents have the statistics real images give) and decoded again, and each latent pixel is
    /// regressed on the mean colour of the f x f block it decodes to. The encoder is released
    /// again unless it was loaded before.
    pub fn fit(pipe: &mut Pipeline) -> Result<Self> {
        let c = pipe.spec.vae.sampler_channels();
        let f = pipe.spec.vae.latent_factor();
        let had_encoder = pipe.encoder.is_some();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut x: Vec<Vec<f64>> = Vec::new();
        let mut y: Vec<[f64; 3]> = Vec::new();
        let side = SIDE * f;
        for _ in 0..SAMPLES {
            let colours = |rng: &mut rand::rngs::StdRng| -> [f64; 3] {
                match rng.random_range(0..4) {
                    0 => [1.0; 3],
                    1 => [0.0; 3],
                    _ => [0, 1, 2].map(|_| rng.random_range(0.0..1.0)),
                }
            };
            // A background with a gentle gradient, and solid discs and boxes on it: the flat
            // colours and edges generated images are made of.
            let (bg, tilt) = (colours(&mut rng), rng.random_range(-0.2..0.2));
            let shapes: Vec<(bool, [f64; 4], [f64; 3])> = (0..3)
                .map(|_| {
                    let round = rng.random_bool(0.5);
                    let geom = [
                        rng.random_range(0.1..0.9),
                        rng.random_range(0.1..0.9),
                        rng.random_range(0.1..0.35),
                        rng.random_range(0.1..0.35),
                    ];
                    (round, geom, colours(&mut rng))
                })
                .collect();
            let mut data = vec![0u8; side * side * 3];
            for i in 0..side {
                for j in 0..side {
                    let (u, v) = (i as f64 / side as f64, j as f64 / side as f64);
                    let mut px = bg.map(|b| b + tilt * (u - 0.5));
                    for (round, [cy, cx, ry, rx], col) in &shapes {
                        let (dy, dx) = ((u - cy) / ry, (v - cx) / rx);
                        let inside = match round {
                            true => dy * dy + dx * dx <= 1.0,
                            false => dy.abs() <= 1.0 && dx.abs() <= 1.0,
                        };
                        if inside {
                            px = *col;
                        }
                    }
                    for k in 0..3 {
                        data[(i * side + j) * 3 + k] =
                            (px[k] * 255.0).round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
            let image = RgbImage {
                width: side,
                height: side,
                data,
            };
            let latents = pipe.encode_mean(&image)?;
            let img = pipe.decode(&latents)?;
            let z: Vec<f32> = latents.flatten_all()?.to_vec1()?;
            for i in 0..SIDE {
                for j in 0..SIDE {
                    let zp: Vec<f64> = (0..c)
                        .map(|ch| z[(ch * SIDE + i) * SIDE + j] as f64)
                        .collect();
                    let mut row = Vec::new();
                    features(&zp, &mut row);
                    x.push(row);
                    let mut mean = [0f64; 3];
                    for py in i * f..(i + 1) * f {
                        for px in j * f..(j + 1) * f {
                            for (k, m) in mean.iter_mut().enumerate() {
                                *m += img.data[(py * img.width + px) * 3 + k] as f64;
                            }
                        }
                    }
                    y.push(mean.map(|m| m / (f * f) as f64));
                }
            }
        }
        if !had_encoder {
            pipe.encoder = None;
        }
        let w = [0, 1, 2].map(|k| {
            let t: Vec<f64> = y.iter().map(|p| p[k]).collect();
            least_squares(&x, &t)
        });
        Ok(Self { channels: c, w })
    }

    /// The preview of latents (b, C, h, w) in sampler space: an h x w image of the first.
    pub fn image(&self, latents: &Tensor) -> Result<RgbImage> {
        let latents = latents.narrow(0, 0, 1)?;
        let (_, c, h, w) = latents.dims4()?;
        if c != self.channels {
            return Err(crate::Error::request(format!(
                "preview: latents of {c} channels for a map of {}",
                self.channels
            )));
        }
        let z: Vec<f32> = latents.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut data = Vec::with_capacity(h * w * 3);
        let (mut zp, mut f) = (vec![0f64; c], Vec::new());
        for p in 0..h * w {
            for (ch, v) in zp.iter_mut().enumerate() {
                *v = z[ch * h * w + p] as f64;
            }
            features(&zp, &mut f);
            for wk in &self.w {
                let v: f64 = wk.iter().zip(&f).map(|(a, b)| a * b).sum();
                data.push(v.round().clamp(0.0, 255.0) as u8);
            }
        }
        Ok(RgbImage {
            width: w,
            height: h,
            data,
        })
    }
}

/// argmin_w |X w - t|² (+ 1e-6 |w|² for stability), by the normal equations and Gaussian
/// elimination with partial pivoting.
fn least_squares(x: &[Vec<f64>], t: &[f64]) -> Vec<f64> {
    let n = x.first().map_or(0, Vec::len);
    let mut a = vec![vec![0f64; n + 1]; n];
    for (row, &ti) in x.iter().zip(t) {
        for i in 0..n {
            for j in 0..n {
                a[i][j] += row[i] * row[j];
            }
            a[i][n] += row[i] * ti;
        }
    }
    for (i, r) in a.iter_mut().enumerate() {
        r[i] += 1e-6;
    }
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let k = row[col] / d;
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= k * p;
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if a[i][i].abs() < 1e-12 {
                0.0
            } else {
                a[i][n] / a[i][i]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_an_exact_linear_map() {
        let x: Vec<Vec<f64>> = (0..50)
            .map(|i| {
                let f = i as f64;
                vec![(f * 0.37).sin(), (f * 0.11).cos(), f / 50.0, 1.0]
            })
            .collect();
        let want = [2.0, -1.5, 0.25, 7.0];
        let t: Vec<f64> = x
            .iter()
            .map(|r| r.iter().zip(&want).map(|(a, b)| a * b).sum())
            .collect();
        let got = least_squares(&x, &t);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
    }
}
