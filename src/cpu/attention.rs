//! Attention for bf16 on the CPU with AMX: per (batch, head) and block of queries, scores
//! `q kᵀ` in f32 on AMX tiles, the scale and softmax in f32 (vectorised exp), probabilities rounded to
//! bf16 for the product with v, output rounded once -- the order of PyTorch's CPU flash attention.
//! No score matrix larger than one query block (64 rows x keys) exists at a time.

use super::amx::{self, PackedB};
use half::bf16;
use rayon::prelude::*;

/// Queries per block.
const QB: usize = 64;

/// `softmax(q kᵀ · scale) v` for `bh` (batch x head) slices: q (bh, n, d), k and v (bh, m, d), all
/// row-major bf16; returns (bh, n, d). Panics if AMX is not [`amx::available`].
#[allow(clippy::too_many_arguments)]
pub fn sdpa_bf16(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    scale: f32,
) -> Vec<bf16> {
    assert!(q.len() == bh * n * d && k.len() == bh * m * d && v.len() == bh * m * d);
    let mut out = vec![bf16::ZERO; bh * n * d];
    if bh == 0 || n == 0 || d == 0 {
        return out;
    }
    // k as the transposed right operand of q kᵀ, v as the right operand of p v.
    let kt: Vec<PackedB> = k
        .par_chunks(m * d)
        .map(|k| PackedB::from_nk(k, m, d))
        .collect();
    let vp: Vec<PackedB> = v
        .par_chunks(m * d)
        .map(|v| PackedB::from_kn(v, m, d))
        .collect();
    let tasks: Vec<(usize, usize)> = (0..bh)
        .flat_map(|i| (0..n.div_ceil(QB)).map(move |b| (i, b)))
        .collect();
    let blocks: Vec<(usize, usize, Vec<bf16>)> = tasks
        .par_iter()
        .map(|&(i, b)| {
            let rows = QB.min(n - b * QB);
            let mrows = rows.next_multiple_of(32);
            let (kd, mp) = (kt[i].k_padded(), kt[i].n_padded()); // d and m, padded
            let mut qs = vec![bf16::ZERO; mrows * kd];
            for r in 0..rows {
                let src = &q[(i * n + b * QB + r) * d..][..d];
                qs[r * kd..r * kd + d].copy_from_slice(src);
            }
            // Scores, rows x m (row stride mp), then probabilities in the layout p v takes.
            let mut s = vec![0f32; mrows * mp];
            amx::matmul_padded(&qs, mrows, &kt[i], &mut s);
            let kv = vp[i].k_padded(); // m padded
            let mut p = vec![bf16::ZERO; mrows * kv];
            for r in 0..rows {
                softmax_row(
                    &mut s[r * mp..r * mp + m],
                    &mut p[r * kv..r * kv + m],
                    scale,
                );
            }
            let dp = vp[i].n_padded();
            let mut o = vec![0f32; mrows * dp];
            amx::matmul_padded(&p, mrows, &vp[i], &mut o);
            let mut ob = vec![bf16::ZERO; rows * d];
            for r in 0..rows {
                for (x, &v) in ob[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(&o[r * dp..r * dp + d])
                {
                    *x = super::round_bf16(v);
                }
            }
            (i, b, ob)
        })
        .collect();
    for (i, b, o) in blocks {
        let at = (i * n + b * QB) * d;
        out[at..at + o.len()].copy_from_slice(&o);
    }
    out
}

super::avx512_dispatch!(softmax_row, softmax_row_generic, (s: &mut [f32], p: &mut [bf16], scale: f32));

/// `p = softmax(s · scale)` over one row, in f32, rounded to bf16. Reductions run over 16 lanes so
/// that they vectorise.
#[inline(always)]
fn softmax_row_generic(s: &mut [f32], p: &mut [bf16], scale: f32) {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = s.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = lanes.iter().fold(tail, |a, &b| a.max(b));
    let shift = max * scale;
    for x in s.iter_mut() {
        *x = *x * scale - shift;
    }
    exp_generic(s);
    let mut lanes = [0f32; 16];
    let chunks = s.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
    for (pv, &x) in p.iter_mut().zip(s.iter()) {
        *pv = super::round_bf16(x * inv);
    }
}

super::avx512_dispatch!(exp_in_place, exp_generic, (xs: &mut [f32]));

/// `e^x` element-wise, to about 2 ulp of f32 for x in [-87, 88] (clamped outside): 2^n · poly(r) with
/// n = round(x / ln 2), the integer taken from the bits of the rounding sum so that no float-to-int
/// conversion stops the loop from vectorising.
#[inline(always)]
fn exp_generic(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    for x in xs.iter_mut() {
        let v = x.clamp(-87.0, 88.0);
        let t = v * LOG2E + ROUND;
        let n = t - ROUND;
        let r = v - n * LN2_HI - n * LN2_LO;
        let mut y = 1.987_569_1e-4_f32;
        y = y * r + 1.398_199_9e-3;
        y = y * r + 8.333_452e-3;
        y = y * r + 4.166_579_6e-2;
        y = y * r + 1.666_666_5e-1;
        y = y * r + 5e-1;
        y = y * r * r + r + 1.0;
        let pow2 = (t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23;
        *x = y * f32::from_bits(pow2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut xs: Vec<f32> = (0..40000).map(|i| -80.0 + i as f32 * 0.004).collect();
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!((g - w).abs() <= 3.0 * f32::EPSILON * w, "{g} vs {w}");
        }
    }

    /// Against an f64 reference of the same bf16 inputs: within bf16 rounding of the probabilities
    /// and of the output.
    #[test]
    fn sdpa_bf16_equals_the_reference() {
        if !amx::available() {
            eprintln!("AMX not available here: test skipped");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = |len: usize| -> Vec<bf16> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0)
                })
                .collect()
        };
        for &(bh, n, m, d) in &[(3, 70, 45, 24), (2, 130, 200, 64)] {
            let (q, k, v) = (rnd(bh * n * d), rnd(bh * m * d), rnd(bh * m * d));
            let scale = 1.0 / (d as f32).sqrt();
            let got = sdpa_bf16(&q, &k, &v, bh, n, m, d, scale);
            for i in 0..bh {
                for r in 0..n {
                    let qi = &q[(i * n + r) * d..][..d];
                    let s: Vec<f64> = (0..m)
                        .map(|j| {
                            let kj = &k[(i * m + j) * d..][..d];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| a.to_f64() * b.to_f64())
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..m)
                            .map(|j| e[j] / z * v[(i * m + j) * d + c].to_f64())
                            .sum();
                        let g = got[(i * n + r) * d + c].to_f64();
                        // bf16 probabilities (2^-9 relative each, |v| <= 3) and the output rounding.
                        let tol = 3.0 * 2f64.powi(-8) + want.abs() * 2f64.powi(-8);
                        assert!(
                            (g - want).abs() <= tol,
                            "({bh},{n},{m},{d}) [{i},{r},{c}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
