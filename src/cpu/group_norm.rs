//! GroupNorm (optionally followed by SiLU) in f32 on the CPU in two passes over the data, for the
//! VAE decoder: candle composes it from a dozen whole-tensor ops (mean, centre, square, mean, ...).
//! Channels-first ([`group_norm_f32`]) or channels-last ([`channels_last_affine`], whose scale and
//! shift per channel a convolution can also apply as it reads the image), the same statistics
//! either way.

use super::lane_sum;
use rayon::prelude::*;

/// x: (b, c, hw) row-major; per (sample, group of c / groups channels): statistics in f64 over
/// per-row f32 sums, `y = (x - mean) / sqrt(var + eps) · gamma[c] + beta[c]` (biased variance, as
/// PyTorch), then `y · sigmoid(y)` when `silu`. Panics if the lengths do not match or `groups` does
/// not divide c.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_f32(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "{groups} groups do not divide {c} channels"
    );
    assert_eq!(x.len(), b * c * hw, "input length");
    assert!(gamma.len() == c && beta.len() == c, "affine length");
    let mut out = vec![0f32; x.len()];
    let per = c / groups * hw;
    if per == 0 {
        return out;
    }
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(i, (o, x))| {
            let c0 = (i % groups) * (c / groups);
            group(x, o, hw, &gamma[c0..], &beta[c0..], eps, silu);
        });
    out
}

/// Pixels per task of the channels-last passes.
const PIXELS: usize = 256;

/// What a GroupNorm (and the SiLU after it) does to one batch of images, per (sample, channel):
/// `y = x · scale + shift`, then `y · sigmoid(y)` when `silu`.
#[derive(Debug, Clone)]
pub struct ChannelAffine {
    channels: usize,
    /// (b, c) each.
    scale: Vec<f32>,
    shift: Vec<f32>,
    silu: bool,
}

impl ChannelAffine {
    /// The images' count (b) and channels (c).
    pub fn dims(&self) -> (usize, usize) {
        (self.scale.len() / self.channels.max(1), self.channels)
    }

    /// o = the affine (and SiLU) of sample `i` on x; x and o are (pixels, c). Panics if `i` is
    /// not a sample of the batch or the lengths differ.
    pub fn apply(&self, i: usize, x: &[f32], o: &mut [f32]) {
        let c = self.channels;
        assert!(
            x.len() == o.len() && x.len().is_multiple_of(c.max(1)),
            "lengths"
        );
        if x.is_empty() {
            return;
        }
        let (scale, shift) = (&self.scale[i * c..][..c], &self.shift[i * c..][..c]);
        affine_channels(x, o, scale, shift, self.silu)
    }

    /// The affine (and SiLU) of each image of x (b, pixels, c), on the rayon pool. Panics if x
    /// is not b images of whole pixels.
    pub fn apply_all(&self, x: &[f32]) -> Vec<f32> {
        let (b, c) = self.dims();
        let mut out = vec![0f32; x.len()];
        if out.is_empty() {
            return out;
        }
        assert!(
            x.len().is_multiple_of(b * c),
            "{} values are not {b} images",
            x.len()
        );
        let image = x.len() / b;
        for (i, (x, out)) in x.chunks(image).zip(out.chunks_mut(image)).enumerate() {
            out.par_chunks_mut(PIXELS * c)
                .zip(x.par_chunks(PIXELS * c))
                .for_each(|(o, x)| self.apply(i, x, o));
        }
        out
    }
}

/// The [`ChannelAffine`] of `GroupNorm(groups, c, eps)` with gamma and beta on x (b, hw, c)
/// channels-last: per sample, the sums of each channel over every pixel (f32 over a task's pixels,
/// f64 across tasks), gathered per group, for the mean, then the same of the squared distances
/// from it, for the (biased) variance. Panics if the lengths do not match or `groups` does not
/// divide c.
#[allow(clippy::too_many_arguments)]
pub fn channels_last_affine(
    x: &[f32],
    b: usize,
    hw: usize,
    c: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> ChannelAffine {
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "{groups} groups do not divide {c} channels"
    );
    assert_eq!(x.len(), b * c * hw, "input length");
    assert!(gamma.len() == c && beta.len() == c, "affine length");
    let mut affine = ChannelAffine {
        channels: c,
        scale: Vec::with_capacity(b * c),
        shift: Vec::with_capacity(b * c),
        silu,
    };
    if x.is_empty() {
        // (No pixels, or no channels: nothing to apply it to.)
        affine.scale.resize(b * c, 0.0);
        affine.shift.resize(b * c, 0.0);
        return affine;
    }
    let cg = c / groups;
    let n = (cg * hw) as f64;
    for x in x.chunks(hw * c) {
        // Each channel's value: the group's statistic, spread over its channels.
        let per_channel = |sums: Vec<f64>| -> Vec<f64> {
            sums.chunks(cg)
                .flat_map(|g| std::iter::repeat_n(g.iter().sum::<f64>() / n, cg))
                .collect()
        };
        let sums = |centre: Option<&[f32]>| -> Vec<f64> {
            x.par_chunks(PIXELS * c)
                .map(|x| {
                    let mut acc = vec![0f64; c];
                    channel_sums(x, centre.unwrap_or(&[]), &mut acc);
                    acc
                })
                .reduce(
                    || vec![0f64; c],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                )
        };
        let mean: Vec<f32> = per_channel(sums(None))
            .into_iter()
            .map(|m| m as f32)
            .collect();
        let var = per_channel(sums(Some(&mean)));
        for ch in 0..c {
            let scale = (gamma[ch] as f64 / (var[ch] + eps).sqrt()) as f32;
            affine.scale.push(scale);
            affine.shift.push(beta[ch] - mean[ch] * scale);
        }
    }
    affine
}

super::vector_dispatch!(channel_sums, channel_sums_generic, (x: &[f32], centre: &[f32], acc: &mut [f64]));

/// Adds to acc (c) each channel's sum over the pixels of x (pixels x c): of the values, or with a
/// `centre` (c) of their squared distances from it.
#[inline(always)]
fn channel_sums_generic(x: &[f32], centre: &[f32], acc: &mut [f64]) {
    let mut lanes = vec![0f32; acc.len()];
    match centre.is_empty() {
        true => x.chunks(acc.len()).for_each(|px| {
            lanes.iter_mut().zip(px).for_each(|(l, &v)| *l += v);
        }),
        false => x.chunks(acc.len()).for_each(|px| {
            let it = lanes.iter_mut().zip(px).zip(centre);
            it.for_each(|((l, &v), &m)| *l += (v - m) * (v - m));
        }),
    }
    acc.iter_mut()
        .zip(&lanes)
        .for_each(|(a, &l)| *a += l as f64);
}

super::vector_dispatch!(affine_channels, affine_channels_generic, (x: &[f32], o: &mut [f32], scale: &[f32], shift: &[f32], silu: bool));

/// o = x · scale + shift per channel (x and o pixels x c), then SiLU when `silu`.
#[inline(always)]
fn affine_channels_generic(x: &[f32], o: &mut [f32], scale: &[f32], shift: &[f32], silu: bool) {
    for (o, x) in o.chunks_mut(scale.len()).zip(x.chunks(scale.len())) {
        let it = o.iter_mut().zip(x).zip(scale.iter().zip(shift));
        it.for_each(|((o, &v), (&a, &b))| *o = v * a + b);
    }
    if silu {
        silu_in_place(o);
    }
}

/// One (sample, group): x and o are (channels, hw).
fn group(x: &[f32], o: &mut [f32], hw: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) {
    let n = x.len() as f64;
    let mean = x.chunks(hw).map(|r| lane_sum(r, |v| v) as f64).sum::<f64>() / n;
    let m32 = mean as f32;
    let var = x
        .chunks(hw)
        .map(|r| lane_sum(r, |v| (v - m32) * (v - m32)) as f64)
        .sum::<f64>()
        / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (ch, (o, x)) in o.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
        let scale = (rstd * gamma[ch] as f64) as f32;
        let shift = beta[ch] - m32 * scale;
        affine(x, o, scale, shift, silu);
    }
}

super::vector_dispatch!(affine, affine_generic, (x: &[f32], o: &mut [f32], scale: f32, shift: f32, silu: bool));

#[inline(always)]
fn affine_generic(x: &[f32], o: &mut [f32], scale: f32, shift: f32, silu: bool) {
    for (o, &v) in o.iter_mut().zip(x) {
        *o = v * scale + shift;
    }
    if silu {
        silu_in_place(o);
    }
}

/// y · sigmoid(y) = y / (1 + e^-y), a chunk at a time through the vectorised exp. (Inlined into
/// its callers, and so compiled with their features.)
#[inline(always)]
fn silu_in_place(o: &mut [f32]) {
    let mut e = [0f32; 256];
    for o in o.chunks_mut(256) {
        let e = &mut e[..o.len()];
        for (e, &y) in e.iter_mut().zip(o.iter()) {
            *e = -y;
        }
        super::attention::exp_generic(e);
        for (y, &e) in o.iter_mut().zip(e.iter()) {
            *y /= 1.0 + e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// Against candle's GroupNorm (and SiLU), offset inputs so that the centring matters.
    #[test]
    fn group_norm_equals_candles() {
        for &(b, c, h, w, g) in &[
            (2, 8, 5, 7, 4),
            (1, 64, 16, 16, 32),
            (1, 6, 1, 3, 3),
            (2, 40, 23, 19, 8),
        ] {
            let x = (crate::cpu::normal_tensor((b, c, h, w), 2.0, 1) + 3.0).unwrap();
            let gamma = (crate::cpu::normal_tensor(c, 0.5, 2) + 1.0).unwrap();
            let beta = crate::cpu::normal_tensor(c, 0.5, 3);
            let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-6).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (gv, bv) = (gamma.to_vec1().unwrap(), beta.to_vec1().unwrap());
            for silu in [false, true] {
                let mut want = gn.forward(&x).unwrap();
                if silu {
                    want = want.silu().unwrap();
                }
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = group_norm_f32(&xs, b, c, h * w, g, &gv, &bv, 1e-6, silu);
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert!((g - v).abs() <= 2e-5 * (1.0 + v.abs()), "{i}: {g} vs {v}");
                }
                // Channels-last: the same values, (b, h, w, c).
                let last = |t: &candle_core::Tensor| {
                    let t = t
                        .reshape((b, c, h, w))
                        .unwrap()
                        .permute((0, 2, 3, 1))
                        .unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                let xl = last(&x);
                let affine = channels_last_affine(&xl, b, h * w, c, g, &gv, &bv, 1e-6, silu);
                let got = affine.apply_all(&xl);
                let want = last(&candle_core::Tensor::new(want.as_slice(), x.device()).unwrap());
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    let ok = (g - v).abs() <= 2e-5 * (1.0 + v.abs());
                    assert!(ok, "channels-last {i}: {g} vs {v}");
                }
            }
        }
    }
}
