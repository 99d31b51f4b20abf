//! Products by a bf16 weight (n x k, PyTorch's layout) in f32 where no packed bf16 kernel runs
//! (CPUs without AVX-512), the weight read as stored: a few rows ([`matmul_few_rows`]: the
//! modulation, time and pooled-text layers, two rows under classifier-free guidance) multiply it
//! widened in registers; more rows ([`matmul`]) widen it a block of rows at a time into a reused
//! buffer for the `gemm` crate. Widening the whole weight on every call (candle's bf16 product)
//! cost 35 ms on one thread for 1536 x 6144 values, to multiply two rows, and a fresh f32 copy of
//! the weight (page faults and zeroing) per call.

use super::Lane;
use half::bf16;
use rayon::prelude::*;

/// The most rows [`matmul_few_rows`] is meant for: each weight row is read once from memory and
/// then once per row of `a` from L1.
pub const FEW: usize = 8;

/// Weight rows per parallel task.
const ROWS: usize = 64;

/// `a · wᵀ (+ bias)` in f32: a (m x k) row-major, w (n x k) row-major bf16 widened exactly, bias
/// (n); returns m x n row-major. Each sum is an f32 dot product over k (16 lanes, then across
/// them) plus the bias. Panics unless the lengths match m, n and k.
pub fn matmul_few_rows(
    a: &[f32],
    m: usize,
    w: &[bf16],
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(a.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    // Column-major first (out_t[j m + r]), so that each task writes one contiguous piece.
    let mut out_t = vec![0f32; n * m];
    if k > 0 && m > 0 {
        out_t
            .par_chunks_mut(ROWS * m)
            .zip(w.par_chunks(ROWS * k))
            .for_each(|(o, w)| dots(a, m, w, k, o));
    }
    let mut out = vec![0f32; m * n];
    for (r, row) in out.chunks_exact_mut(n.max(1)).enumerate().take(m) {
        for (j, o) in row.iter_mut().enumerate().take(n) {
            *o = out_t[j * m + r] + bias.map_or(0.0, |b| b[j]);
        }
    }
    out
}

/// Bytes of f32 weight widened per block in [`matmul`] (an L2's worth or two).
const BLOCK_BYTES: usize = 2 << 20;

/// `a · wᵀ (+ bias)` in f32 as [`matmul_few_rows`], for any number of rows: a block of w's rows
/// at a time widened exactly into a per-thread buffer and multiplied by the `gemm` crate on the
/// rayon pool, into that block's columns of the output. Panics unless the lengths match.
pub fn matmul(
    a: &[f32],
    m: usize,
    w: &[bf16],
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(a.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    let mut out = vec![0f32; m * n];
    if m * n * k > 0 {
        let block = (BLOCK_BYTES / (4 * k)).max(16).min(n);
        WIDE.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            for j0 in (0..n).step_by(block) {
                let cols = block.min(n - j0);
                buf.resize(cols * k, 0.0);
                buf.par_chunks_mut(k)
                    .zip(w[j0 * k..(j0 + cols) * k].par_chunks(k))
                    .for_each(|(o, w)| super::elementwise::widen_bf16(w, o));
                // Columns j0 .. j0 + cols of the output: a (m x k) times the block read as the
                // k x cols operand wᵀ (row stride 1, column stride k).
                super::gemm_f32(
                    (m, cols, k),
                    (&mut out[j0..], n),
                    (a, 1, k),
                    (buf, k, 1),
                    true,
                );
            }
        });
    }
    if let Some(bias) = bias {
        super::add_bias(&mut out, bias);
    }
    out
}

thread_local! {
    /// Per-thread block of the weight widened to f32, for [`matmul`].
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

super::vector_dispatch!(dots, dots_generic, (a: &[f32], m: usize, w: &[bf16], k: usize, o: &mut [f32]));

/// `o[j m + r] = a row r · w row j` for the rows of w (k >= 1).
#[inline(always)]
fn dots_generic(a: &[f32], m: usize, w: &[bf16], k: usize, o: &mut [f32]) {
    for (wr, o) in w.chunks_exact(k).zip(o.chunks_exact_mut(m)) {
        for (ar, o) in a.chunks_exact(k).zip(o.iter_mut()) {
            *o = dot(ar, wr);
        }
    }
}

/// `Σ a[i] w[i]` in f32 over 16 lanes and then across them, so that the loop vectorises.
#[inline(always)]
fn dot(a: &[f32], w: &[bf16]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, wc) = (a.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(&a, &w)| a * w.widen())
        .sum();
    for (a, w) in ac.zip(wc) {
        for ((l, &a), &w) in lanes.iter_mut().zip(a).zip(w) {
            *l += a * w.widen();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`matmul_few_rows`] and [`matmul`].
    type Product = fn(&[f32], usize, &[bf16], (usize, usize), Option<&[f32]>) -> Vec<f32>;

    /// Both products against an f64 reference of the same values, within f32 summation error; odd
    /// sizes (a partial task, k off the lanes, k = 0, no rows, several widened blocks of which
    /// the last partial).
    #[test]
    fn products_equal_the_reference() {
        let mut seed = 3;
        let shapes = [
            (2, 130, 77),
            (1, 1, 1),
            (8, 64, 1536),
            (3, 5, 0),
            (0, 4, 9),
            (20, 700, 1536),
        ];
        for &(m, n, k) in &shapes {
            let a = crate::cpu::lcg_uniform(m * k, &mut seed, -1.0, 1.0);
            let w: Vec<bf16> = crate::cpu::lcg_uniform(n * k, &mut seed, -1.0, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let bias = crate::cpu::lcg_uniform(n, &mut seed, -1.0, 1.0);
            let products: [(&str, Product); 2] =
                [("few rows", matmul_few_rows), ("blocks", matmul)];
            for (name, product) in products {
                let got = product(&a, m, &w, (n, k), Some(&bias));
                assert_eq!(got.len(), m * n);
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = bias[j] as f64
                            + (0..k)
                                .map(|i| a[r * k + i] as f64 * w[j * k + i].to_f64())
                                .sum::<f64>();
                        let g = got[r * n + j] as f64;
                        let tol = 1e-5 * (1.0 + k as f64).sqrt();
                        assert!(
                            (g - want).abs() <= tol,
                            "{name} {m}x{n}x{k} ({r},{j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
