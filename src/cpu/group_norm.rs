//! GroupNorm (optionally followed by SiLU) in f32 on the CPU in two passes over the data, for the
//! VAE decoder: candle composes it from a dozen whole-tensor ops (mean, centre, square, mean, ...).

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

super::avx512_dispatch!(affine, affine_generic, (x: &[f32], o: &mut [f32], scale: f32, shift: f32, silu: bool));

#[inline(always)]
fn affine_generic(x: &[f32], o: &mut [f32], scale: f32, shift: f32, silu: bool) {
    for (o, &v) in o.iter_mut().zip(x) {
        *o = v * scale + shift;
    }
    if silu {
        // y · sigmoid(y) = y / (1 + e^-y), a chunk at a time through the vectorised exp.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// Against candle's GroupNorm (and SiLU), offset inputs so that the centring matters.
    #[test]
    fn group_norm_equals_candles() {
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 64, 16, 16, 32), (1, 6, 1, 3, 3)] {
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
            }
        }
    }
}
