//! Attention for bf16 on the CPU with AMX: per (batch, head) and block of queries, scores
//! `q kᵀ` in f32 on AMX tiles, the scale and exponentials in f32 (vectorised exp), the
//! exponentials rounded to bf16 for the product with v and the product divided by their f32 sum
//! (times its reciprocal) as the output is rounded once -- the order of PyTorch's CPU flash
//! attention, which also normalises at the end.
//! No score matrix larger than one query block (64 rows x keys) exists at a time. Without AMX the
//! same order runs on AVX512-BF16 dot products ([`sdpa_dpbf16`]), or in f32 ([`sdpa_f32`]).

use super::aligned::Aligned;
use super::amx::{self, PackedB};
use super::dpbf16::{self, PackedPairs};
use super::sgemm;
use half::bf16;
use rayon::prelude::*;

/// Queries per block (bf16: two 32-row AMX blocks; f32: seven micro-kernel row groups).
const QB: usize = 64;
const QB_F32: usize = 7 * sgemm::MR;
const QB_DPBF16: usize = 4 * dpbf16::MR;

/// The shape of an attention: `bh` (batch x head) slices of `n` queries and `m` keys of width `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub bh: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
}

impl Heads {
    /// Panics unless q is (bh, n, d) and k, v are (bh, m, d).
    fn check<T>(&self, q: &[T], k: &[T], v: &[T]) {
        let Heads { bh, n, m, d } = *self;
        assert!(q.len() == bh * n * d && k.len() == bh * m * d && v.len() == bh * m * d);
    }

    /// Slice `i` of `bh`'s bias, n x m, out of a (h, n, m) `bias` ([`Self::check_bias`]): head
    /// i mod h's.
    fn bias_of<'a>(&self, bias: Option<&'a [f32]>, i: usize) -> Option<&'a [f32]> {
        let per = self.n * self.m;
        bias.map(|b| &b[(i % (b.len() / per)) * per..][..per])
    }

    /// Panics unless `bias` holds (h, n, m) values for an h that divides bh.
    fn check_bias(&self, bias: &[f32]) {
        let per = self.n * self.m;
        assert!(
            per == 0
                || (!bias.is_empty()
                    && bias.len().is_multiple_of(per)
                    && self.bh.is_multiple_of(bias.len() / per)),
            "attention bias is not (heads, n, m) for a divisor of bh"
        );
    }
}

/// `softmax(q kᵀ · scale) v` over [`Heads`]: q (bh, n, d), k and v (bh, m, d), all row-major bf16;
/// returns (bh, n, d). Panics if AMX is not [`amx::available`].
pub fn sdpa_bf16(q: &[bf16], k: &[bf16], v: &[bf16], heads: Heads, scale: f32) -> Vec<bf16> {
    sdpa_bf16_inner(q, k, v, heads, scale, None)
}

/// `softmax(q kᵀ · scale + bias) v` as [`sdpa_bf16`], `bias` (h, n, m) in f32 added to each
/// block's f32 scores once scaled, before the exponentials (slice i of `bh` takes head i mod h), as
/// [`sdpa_f32_biased`] adds it and PyTorch's CPU flash attention adds its mask: T5's relative
/// position bias, a language model's causal and padding mask. Panics as [`sdpa_bf16`] does, and
/// unless h divides `bh` and the bias holds h x n x m values.
pub fn sdpa_bf16_biased(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: Heads,
    scale: f32,
    bias: &[f32],
) -> Vec<bf16> {
    heads.check_bias(bias);
    sdpa_bf16_inner(q, k, v, heads, scale, Some(bias))
}

fn sdpa_bf16_inner(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: Heads,
    scale: f32,
    bias: Option<&[f32]>,
) -> Vec<bf16> {
    heads.check(q, k, v);
    let Heads { bh, n, m, d } = heads;
    if bh == 0 || n == 0 || m == 0 || d == 0 {
        return vec![bf16::ZERO; bh * n * d];
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
    // SAFETY: every value of each head's output is written: its blocks of QB queries (the last
    // shorter) partition it, and block_bf16 writes a row of d for each query of its block.
    unsafe {
        super::par_written(bh * n * d, n * d, |head, o| {
            let q = &q[head * n * d..][..n * d];
            let bias = heads.bias_of(bias, head);
            o.par_chunks_mut(QB * d)
                .zip(q.par_chunks(QB * d))
                .enumerate()
                .for_each(|(blk, (o, q))| {
                    let bias = bias.map(|b| &b[blk * QB * m..][..q.len() / d * m]);
                    BF16_SCRATCH.with(|sc| {
                        let (qs, s, p, acc) = &mut *sc.borrow_mut();
                        let scratch = Scratch { qs, s, p, acc };
                        block_bf16(q, o, (&kt[head], &vp[head]), m, d, scale, bias, scratch)
                    })
                });
        })
    }
}

thread_local! {
    /// Per-thread padded queries, scores, probabilities and output of [`block_bf16`] (reused:
    /// fresh buffers of this size cost page faults on every block).
    #[allow(clippy::type_complexity)]
    static BF16_SCRATCH: std::cell::RefCell<(Aligned<bf16>, Aligned<f32>, Aligned<bf16>, Aligned<f32>)> =
        const { std::cell::RefCell::new((Aligned::new(), Aligned::new(), Aligned::new(), Aligned::new())) };
}

/// [`block_bf16`]'s buffers: padded queries, scores, probabilities and output.
struct Scratch<'a> {
    qs: &'a mut Aligned<bf16>,
    s: &'a mut Aligned<f32>,
    p: &'a mut Aligned<bf16>,
    acc: &'a mut Aligned<f32>,
}

/// One block of queries q (rows x d) of one head into o (rows x d), every value written, from k
/// and v packed ([`PackedB`]: kᵀ, v); `bias`, if any, holds the block's rows x m.
#[allow(clippy::too_many_arguments)]
fn block_bf16(
    q: &[bf16],
    o: &mut [std::mem::MaybeUninit<bf16>],
    (kt, vp): (&PackedB, &PackedB),
    m: usize,
    d: usize,
    scale: f32,
    bias: Option<&[f32]>,
    Scratch { qs, s, p, acc }: Scratch,
) {
    let rows = q.len() / d;
    let mrows = rows.next_multiple_of(32);
    let (kd, mp) = (kt.k_padded(), kt.n_padded()); // d and m, padded
    qs.reset(mrows * kd);
    for (r, src) in q.chunks_exact(d).enumerate() {
        qs[r * kd..r * kd + d].copy_from_slice(src);
    }
    // Scores, rows x m (row stride mp), then probabilities in the layout p v takes: zero past m
    // (v's padding rows are zeros, but 0 times a stale NaN is not) and in the padding rows.
    s.resize(mrows * mp);
    amx::matmul_padded(qs, mrows, kt, s);
    let kv = vp.k_padded(); // m padded
    p.resize(mrows * kv);
    let inv: Vec<f32> = (0..rows)
        .map(|r| {
            let (row, tail) = p[r * kv..(r + 1) * kv].split_at_mut(m);
            tail.fill(bf16::ZERO);
            let bias = bias.map(|b| &b[r * m..][..m]);
            exp_row_biased(&mut s[r * mp..r * mp + m], row, scale, bias)
        })
        .collect();
    p[rows * kv..].fill(bf16::ZERO);
    let dp = vp.n_padded();
    acc.resize(mrows * dp);
    amx::matmul_padded(p, mrows, vp, acc);
    for ((orow, a), inv) in o.chunks_exact_mut(d).zip(acc.chunks_exact(dp)).zip(inv) {
        for (x, &v) in orow.iter_mut().zip(&a[..d]) {
            x.write(super::round_bf16(v * inv));
        }
    }
}

/// [`sdpa_bf16`] on AVX512-BF16 dot products ([`dpbf16`]) where there is no AMX: the same
/// roundings (scores summed in f32 from exact products, probabilities rounded to bf16, output
/// rounded once). Panics if [`dpbf16::available`] is false.
pub fn sdpa_dpbf16(q: &[bf16], k: &[bf16], v: &[bf16], heads: Heads, scale: f32) -> Vec<bf16> {
    sdpa_dpbf16_inner(q, k, v, heads, scale, None)
}

/// [`sdpa_dpbf16`] with a bias, added as [`sdpa_bf16_biased`] adds it. Panics as both do.
pub fn sdpa_dpbf16_biased(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: Heads,
    scale: f32,
    bias: &[f32],
) -> Vec<bf16> {
    heads.check_bias(bias);
    sdpa_dpbf16_inner(q, k, v, heads, scale, Some(bias))
}

fn sdpa_dpbf16_inner(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: Heads,
    scale: f32,
    bias: Option<&[f32]>,
) -> Vec<bf16> {
    heads.check(q, k, v);
    let Heads { bh, n, m, d } = heads;
    if bh == 0 || n == 0 || m == 0 || d == 0 {
        return vec![bf16::ZERO; bh * n * d];
    }
    // SAFETY: every value of each head's output is written: its blocks of QB_DPBF16 queries (the
    // last shorter) partition it, and each block writes a row of d for each of its queries.
    unsafe {
        super::par_written(bh * n * d, n * d, |i, o| {
            let (q, k, v) = (
                &q[i * n * d..][..n * d],
                &k[i * m * d..][..m * d],
                &v[i * m * d..][..m * d],
            );
            let bias = heads.bias_of(bias, i);
            let kt = PackedPairs::from_nk(k, m, d);
            // v with a zero key row when m is odd, and p rows of m2 with a zero column: the
            // product with v then reads whole pairs of p where they lie (no copy of p).
            let m2 = m.next_multiple_of(2);
            let vp = PackedPairs::from_kn(v, m, d).with_even_k();
            o.par_chunks_mut(QB_DPBF16 * d)
                .zip(q.par_chunks(QB_DPBF16 * d))
                .enumerate()
                .for_each(|(blk, (o, q))| {
                    DPBF16_SCRATCH.with(|sc| {
                        let (s, p, acc) = &mut *sc.borrow_mut();
                        let rows = q.len() / d;
                        let bias = bias.map(|b| &b[blk * QB_DPBF16 * m..][..rows * m]);
                        // (Not cleared: each product writes all of its output, the exponentials
                        // all of p but the padding column, written here.)
                        s.resize(rows * m);
                        dpbf16::matmul_serial(q, rows, d, &kt, s, m);
                        p.resize(rows * m2);
                        let inv: Vec<f32> = (s.chunks_exact_mut(m).zip(p.chunks_exact_mut(m2)))
                            .enumerate()
                            .map(|(r, (s, p))| {
                                p[m..].fill(bf16::ZERO);
                                let bias = bias.map(|b| &b[r * m..][..m]);
                                exp_row_biased(s, &mut p[..m], scale, bias)
                            })
                            .collect();
                        acc.resize(rows * d);
                        dpbf16::matmul_serial(p, rows, m2, &vp, acc, d);
                        for ((o, a), inv) in o.chunks_exact_mut(d).zip(acc.chunks_exact(d)).zip(inv)
                        {
                            for (x, &v) in o.iter_mut().zip(a) {
                                x.write(super::round_bf16(v * inv));
                            }
                        }
                    })
                });
        })
    }
}

thread_local! {
    /// Per-thread scores, probabilities and output of one query block in [`sdpa_dpbf16`].
    #[allow(clippy::type_complexity)]
    static DPBF16_SCRATCH: std::cell::RefCell<(Aligned<f32>, Aligned<bf16>, Aligned<f32>)> =
        const { std::cell::RefCell::new((Aligned::new(), Aligned::new(), Aligned::new())) };
}

/// `softmax(q kᵀ · scale) v` in f32 over [`Heads`], as [`sdpa_bf16`] but with the AVX-512 f32
/// kernel: per block of queries the scores (rows x keys, f32) are the only intermediate. Panics if
/// [`sgemm::available`] is false.
pub fn sdpa_f32(q: &[f32], k: &[f32], v: &[f32], heads: Heads, scale: f32) -> Vec<f32> {
    sdpa_f32_inner(q, k, v, heads, scale, None)
}

/// [`sdpa_f32`] on bf16 q, k and v, widened exactly (q a block at a time inside the product, k and
/// v as bf16 panels), the output rounded once as the kernel stores it: bf16 where there is neither
/// AMX nor a fast AVX512-BF16 ([`super::Features::bf16_dot`]). The values of widening the inputs,
/// [`sdpa_f32`] and rounding its output. Panics if [`sgemm::available`] is false.
pub fn sdpa_widened(q: &[bf16], k: &[bf16], v: &[bf16], heads: Heads, scale: f32) -> Vec<bf16> {
    sdpa_f32_inner(q, k, v, heads, scale, None)
}

/// `softmax(q kᵀ · scale + bias) v` in f32, as [`sdpa_f32`], with `bias` (h, n, m) added to the
/// scores of every batch (slice i of `bh` takes head i mod h): T5's relative-position bias with
/// its key mask. Panics unless h divides `bh` and the bias holds h x n x m values, or if
/// [`sgemm::available`] is false.
pub fn sdpa_f32_biased(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: Heads,
    scale: f32,
    bias: &[f32],
) -> Vec<f32> {
    heads.check_bias(bias);
    sdpa_f32_inner(q, k, v, heads, scale, Some(bias))
}

/// [`sdpa_f32_biased`] on bf16 q, k and v, as [`sdpa_widened`] takes them: the values of widening
/// the inputs, [`sdpa_f32_biased`] and rounding its output (T5's bias and a language model's mask
/// on a CPU with AVX-512 but neither AMX nor a fast AVX512-BF16). Panics as [`sdpa_f32_biased`]
/// does.
pub fn sdpa_widened_biased(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: Heads,
    scale: f32,
    bias: &[f32],
) -> Vec<bf16> {
    heads.check_bias(bias);
    sdpa_f32_inner(q, k, v, heads, scale, Some(bias))
}

/// The f32 attention on inputs and output of f32 or bf16 (T).
fn sdpa_f32_inner<T>(
    q: &[T],
    k: &[T],
    v: &[T],
    heads: Heads,
    scale: f32,
    bias: Option<&[f32]>,
) -> Vec<T>
where
    T: sgemm::AElem + sgemm::PanelElem + super::OutElem + candle_core::WithDType,
{
    heads.check(q, k, v);
    let Heads { bh, n, m, d } = heads;
    let mut out = vec![T::zero(); bh * n * d];
    if bh == 0 || n == 0 || m == 0 || d == 0 {
        return out;
    }
    out.par_chunks_mut(n * d)
        .zip(q.par_chunks(n * d))
        .zip(k.par_chunks(m * d).zip(v.par_chunks(m * d)))
        .enumerate()
        .for_each(|(i, ((o, q), (k, v)))| {
            let kt = sgemm::Packed::<T>::from_nk(k, m, d);
            let vp = sgemm::Packed::<T>::from_kn(v, m, d);
            let bias = heads.bias_of(bias, i);
            o.par_chunks_mut(QB_F32 * d)
                .zip(q.par_chunks(QB_F32 * d))
                .enumerate()
                .for_each(|(blk, (o, q))| {
                    let rows = q.len() / d;
                    SCORES.with(|s| {
                        let s = &mut *s.borrow_mut();
                        s.reset(rows * m);
                        sgemm::matmul_serial_as(q, rows, d, &kt, s, m);
                        let bias = bias.map(|b| &b[blk * QB_F32 * m..][..rows * m]);
                        softmax_rows(s, m, scale, bias);
                        sgemm::matmul_serial_as(s, rows, m, &vp, o, d);
                    });
                });
        });
    out
}

/// Queries per block of [`sdpa_gemm`]: its scores (rows x keys, f32) are at most 128 x m.
const QB_GEMM: usize = 128;

/// `softmax(q kᵀ · scale + bias) v` in f32 over [`Heads`] on the `gemm` crate (candle's own matrix
/// product: AVX2 and FMA where the CPU has them, portable code elsewhere), for CPUs without
/// AVX-512: the order of [`sdpa_f32`] (per block of queries the scores are the only intermediate,
/// the scale and softmax in f32 with the vectorised exp). q, k and v are f32 or bf16 (widened
/// exactly: k and v once per head, q a block at a time; f32 read where it lies) and the output
/// rounded once to their type. `bias`, when given, is added to the scaled scores as
/// [`sdpa_f32_biased`] adds it. Panics unless the lengths match `heads` (and the bias is (h, n, m)
/// for an h that divides bh). Each head's values are the same whatever heads run beside it, and
/// each query's whatever block it falls in (`cpu::gemm_f32`).
pub fn sdpa_gemm<T: super::Lane>(
    q: &[T],
    k: &[T],
    v: &[T],
    heads: Heads,
    scale: f32,
    bias: Option<&[f32]>,
) -> Vec<T> {
    heads.check(q, k, v);
    if let Some(b) = bias {
        heads.check_bias(b);
    }
    let Heads { bh, n, m, d } = heads;
    let mut out = vec![T::zero(); bh * n * d];
    if bh == 0 || n == 0 || m == 0 || d == 0 {
        return out;
    }
    let bias_heads = bias.map_or(1, |b| b.len() / (n * m));
    out.par_chunks_mut(n * d)
        .zip(q.par_chunks(n * d))
        .zip(k.par_chunks(m * d).zip(v.par_chunks(m * d)))
        .enumerate()
        .for_each(|(i, ((o, q), (k, v)))| {
            let (mut kw, mut vw) = (Vec::new(), Vec::new());
            let (k, v) = (T::f32s(k, &mut kw), T::f32s(v, &mut vw));
            let bias = bias.map(|b| &b[(i % bias_heads) * n * m..][..n * m]);
            o.par_chunks_mut(QB_GEMM * d)
                .zip(q.par_chunks(QB_GEMM * d))
                .enumerate()
                .for_each(|(blk, (o, q))| {
                    let rows = q.len() / d;
                    GEMM_SCRATCH.with(|sc| {
                        let (qw, s, ow) = &mut *sc.borrow_mut();
                        let qw = T::f32s(q, qw);
                        s.resize(rows * m, 0.0);
                        ow.resize(rows * d, 0.0);
                        // Scores: qw (rows x d) times k (m x d) read as the d x m operand kᵀ.
                        super::gemm_f32((rows, m, d), (s, m), (qw, 1, d), (k, d, 1), false);
                        let bias = bias.map(|b| &b[blk * QB_GEMM * m..][..rows * m]);
                        softmax_rows(s, m, scale, bias);
                        super::gemm_f32((rows, d, m), (ow, d), (s, 1, m), (v, 1, d), false);
                        for (o, &x) in o.iter_mut().zip(ow.iter()) {
                            *o = T::narrow(x);
                        }
                    });
                });
        });
    out
}

thread_local! {
    /// Per-thread query block (widened), scores and output block (f32) of [`sdpa_gemm`].
    #[allow(clippy::type_complexity)]
    static GEMM_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Each row of `s` (scores, m each) as probabilities, `softmax(s · scale + bias)` in f32: its
/// exponentials and 1 / their sum, then the products. (Scaling the row's d outputs instead after
/// the product with v was 4% faster on AVX-512, but moved the bf16 demo, which comes here, to 38.35
/// dB mean against diffusers' f32, under its floor of 38.53: see docs/performance.md.) `bias`, when
/// given, holds as many rows of m as s.
fn softmax_rows(s: &mut [f32], m: usize, scale: f32, bias: Option<&[f32]>) {
    for (r, row) in s.chunks_exact_mut(m).enumerate() {
        let inv = match bias {
            Some(b) => {
                scale_add(row, &b[r * m..][..m], scale);
                exp_in_place(row, 1.0)
            }
            None => exp_in_place(row, scale),
        };
        for x in row {
            *x *= inv;
        }
    }
}

// `scale_add(s, bias, scale)`: `s = s · scale + bias` (two roundings, as PyTorch's CPU flash
// attention scales its scores and adds its mask), over one row.
super::vector_dispatch!(scale_add, scale_add_generic, (s: &mut [f32], bias: &[f32], scale: f32));

#[inline(always)]
fn scale_add_generic(s: &mut [f32], bias: &[f32], scale: f32) {
    for (x, &b) in s.iter_mut().zip(bias) {
        *x = *x * scale + b;
    }
}

thread_local! {
    /// Per-thread scores of one query block in [`sdpa_f32`].
    static SCORES: std::cell::RefCell<Aligned<f32>> = const { std::cell::RefCell::new(Aligned::new()) };
}

super::vector_dispatch!(exp_row_vectorised, exp_row_generic, (s: &[f32], p: &mut [bf16], scale: f32) -> f32);

/// [`exp_row`] of `s · scale + bias` where a bias row is given (`s` overwritten with it first, as
/// [`softmax_rows`] adds it), else of `s · scale`.
fn exp_row_biased(s: &mut [f32], p: &mut [bf16], scale: f32, bias: Option<&[f32]>) -> f32 {
    match bias {
        Some(b) => {
            scale_add(s, b, scale);
            exp_row(s, p, 1.0)
        }
        None => exp_row(s, p, scale),
    }
}

/// [`exp_row_generic`]: on AVX512-BF16 (every CPU of the bf16 attention kernels has it) in
/// intrinsics, else as the compiler vectorises it.
fn exp_row(s: &[f32], p: &mut [bf16], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512_bf16 {
        // SAFETY: the feature switch reports AVX512-BF16 only where the CPU has it with AVX-512F,
        // AVX512BW, AVX512VL and AVX512DQ.
        return unsafe { exp_row_avx512_bf16(s, p, scale) };
    }
    exp_row_vectorised(s, p, scale)
}

/// [`exp_row_generic`] in AVX-512 intrinsics: the same base-2 reduction and polynomial, with
/// fused multiply-adds (which Rust does not form from `a * b + c`), the fraction `t - floor(t)` by
/// `vreduceps` and the power of two `2^floor(t)` applied by `vscalefps` (which takes the floor
/// itself), the rounding to bf16 by `vcvtneps2bf16` (nearest even, as [`super::round_bf16`]; its
/// denormals-as-zero never applies: a value is 0 or at least 2^-126, a normal). Nine vector
/// operations per 16 exponentials between the load and the rounding.
///
/// # Safety
/// The CPU must have AVX-512F, AVX512DQ, AVX512-BF16, AVX512BW and AVX512VL (the masked 16-bit
/// store: without the last two enabled here it stayed a call for every 16 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bf16,avx512bw,avx512vl")]
unsafe fn exp_row_avx512_bf16(s: &[f32], p: &mut [bf16], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = s.len().min(p.len());
    let (s, p) = (&s[..n], &mut p[..n]);
    let (a, b) = exp2_operands(row_max_avx512(s), scale);
    let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    // 2^(x · a - b) of the 16 values at i (masked to `mask`), rounded into p; returns the f32
    // values (zero outside the mask). Called below only with lanes inside s and p.
    let mut lanes = |i: usize, mask: __mmask16| {
        // SAFETY: lanes i .. i + 16 under `mask` lie inside s and p (the loops below keep
        // i + 16 <= n for a full mask, and mask off the lanes from n on); masked loads and stores
        // touch no lane beyond them. The transmute reinterprets 16 bf16 as 256 bits.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, s.as_ptr().add(i));
            let e = exp2_16(_mm512_fmsub_ps(x, va, vb), mask);
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(p.as_mut_ptr().add(i).cast(), mask, b);
            e
        }
    };
    // Four vectors a round, each into its own sum (in registers: four chains that overlap), then
    // the rest a (masked) vector at a time. The sums' order is exp_row_generic's: lane l of sum
    // u gathers the values at 64 r + 16 u + l.
    let mut sums = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (u, sum) in sums.iter_mut().enumerate() {
            *sum = _mm512_add_ps(*sum, lanes(i + 16 * u, 0xffff));
        }
        i += 64;
    }
    let mut rest = _mm512_setzero_ps();
    while i < n {
        let mask = super::low_lanes((n - i).min(16));
        rest = _mm512_add_ps(rest, lanes(i, mask));
        i += 16;
    }
    let total = _mm512_add_ps(
        _mm512_add_ps(sums[0], sums[1]),
        _mm512_add_ps(sums[2], sums[3]),
    );
    1.0 / (_mm512_reduce_add_ps(total) + _mm512_reduce_add_ps(rest))
}

/// [`row_max`] in AVX-512 intrinsics: four running maxima (independent chains), NaNs passed over
/// as there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_max_avx512(s: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = s.len();
    let lowest = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = [lowest; 4];
    let mut i = 0;
    // SAFETY: every load below reads lanes i .. i + 16 of s that the mask leaves (all of them
    // below n; masked-off lanes are not read).
    unsafe {
        while i + 64 <= n {
            for (u, m) in m.iter_mut().enumerate() {
                // vmaxps returns its second operand when the first is NaN: a NaN is passed over.
                *m = _mm512_max_ps(_mm512_loadu_ps(s.as_ptr().add(i + 16 * u)), *m);
            }
            i += 64;
        }
        while i < n {
            let mask = super::low_lanes((n - i).min(16));
            let x = _mm512_mask_loadu_ps(lowest, mask, s.as_ptr().add(i));
            m[0] = _mm512_max_ps(x, m[0]);
            i += 16;
        }
    }
    let m = _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3]));
    _mm512_reduce_max_ps(m)
}

/// `2^t` of the 16 lanes of `t` under `mask` as [`exp2_generic`] (0 elsewhere): `2^floor(t) ·
/// p(t - floor(t))`, exactly 0 below -126 (and for NaN).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn exp2_16(
    t: std::arch::x86_64::__m512,
    mask: std::arch::x86_64::__mmask16,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // t - floor(t), in [0, 1): no fraction bits kept, rounded down, no precision exception.
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    // SAFETY: AVX-512F is enabled here.
    unsafe { exp2_of_parts16(t, f, mask) }
}

/// [`exp2_16`] given `f = t - floor(t)` (on AVX-512F alone, f from `vrndscaleps`): the polynomial
/// and `vscalefps`, which applies `2^floor(t)` itself.
///
/// # Safety
/// AVX-512F available (it inlines into callers compiled with it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp2_of_parts16(
    t: std::arch::x86_64::__m512,
    f: std::arch::x86_64::__m512,
    mask: std::arch::x86_64::__mmask16,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is available (# Safety); the operations touch no memory.
    unsafe {
        let c = _mm512_set1_ps;
        let mut y = c(EXP2_POLY[0]);
        for k in &EXP2_POLY[1..] {
            y = _mm512_fmadd_ps(y, f, c(*k));
        }
        let y = _mm512_fmadd_ps(y, f, c(1.0));
        let normal = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(mask, t, c(EXP2_LOWEST));
        _mm512_maskz_scalef_ps(normal, y, t)
    }
}

/// The multiplier and shift of a row's base-2 exponentials, `e^(x · scale - max · scale) =
/// 2^(x · a - b)`: a = scale · log2(e), b = max · a (each rounded once; the row's maximum gives
/// 2^(tiny) = 1 up to the rounding of b).
#[inline(always)]
fn exp2_operands(max: f32, scale: f32) -> (f32, f32) {
    let a = scale * std::f32::consts::LOG2_E;
    (a, max * a)
}

/// `p = e^(s · scale - max · scale)` over one row of scores, in f32, rounded to bf16; returns 1 /
/// the f32 sum (the softmax's normalisation, applied to the product with v). One pass after the
/// maximum: the exponentials never stored in f32. In base 2 ([`exp2_operands`], [`exp2_generic`]),
/// one multiply-add from score to exponent: the bf16 attentions' exponentials, 1.5e-7 relative
/// from their exponent (PyTorch's flash attention's are within 20 ulp).
#[inline(always)]
fn exp_row_generic(s: &[f32], p: &mut [bf16], scale: f32) -> f32 {
    let (a, b) = exp2_operands(row_max(s), scale);
    // 64 at a time (four vectors, whose chains of dependent operations then overlap).
    let mut sums = [0f32; 64];
    let mut e = [0f32; 64];
    let (mut s, mut p) = (s.chunks_exact(64), p.chunks_exact_mut(64));
    for (s, p) in (&mut s).zip(&mut p) {
        for (e, &x) in e.iter_mut().zip(s) {
            *e = x.mul_add(a, -b);
        }
        exp2_generic(&mut e);
        for ((l, p), &v) in sums.iter_mut().zip(p.iter_mut()).zip(e.iter()) {
            *l += v;
            *p = super::round_bf16(v);
        }
    }
    let (s, p) = (s.remainder(), p.into_remainder());
    let e = &mut e[..s.len()];
    for (e, &x) in e.iter_mut().zip(s) {
        *e = x.mul_add(a, -b);
    }
    exp2_generic(e);
    for (p, &v) in p.iter_mut().zip(e.iter()) {
        *p = super::round_bf16(v);
    }
    1.0 / (sums.iter().sum::<f32>() + e.iter().sum::<f32>())
}

// `exp_in_place(s, scale)`: `s = e^(s · scale - max · scale)` over one row, in f32 (the softmax
// before its normalisation); returns 1 / the sum.
super::vector_dispatch!(exp_in_place, exp_in_place_generic, (s: &mut [f32], scale: f32) -> f32);

#[inline(always)]
fn exp_in_place_generic(s: &mut [f32], scale: f32) -> f32 {
    exp_shifted(s, scale)
}

/// The largest of `s` (over 16 lanes, so that it vectorises).
#[inline(always)]
fn row_max(s: &[f32]) -> f32 {
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
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// `s = e^(s · scale - max · scale)`; returns 1 / the sum. In base 2 as the bf16 rows
/// ([`exp_row_generic`]): 8% off `sdpa_f32` on AVX-512. Reductions run over 16 and 64 lanes so that
/// they vectorise.
#[inline(always)]
fn exp_shifted(s: &mut [f32], scale: f32) -> f32 {
    let (a, b) = exp2_operands(row_max(s), scale);
    // Shifted, exponentiated and summed 64 at a time (four vectors, whose chains of dependent
    // operations then overlap), in one pass.
    let mut sums = [0f32; 64];
    let mut chunks = s.chunks_exact_mut(64);
    for c in &mut chunks {
        for x in c.iter_mut() {
            *x = x.mul_add(a, -b);
        }
        exp2_generic(c);
        for (l, &v) in sums.iter_mut().zip(c.iter()) {
            *l += v;
        }
    }
    let tail = chunks.into_remainder();
    for x in tail.iter_mut() {
        *x = x.mul_add(a, -b);
    }
    exp2_generic(tail);
    1.0 / (sums.iter().sum::<f32>() + tail.iter().sum::<f32>())
}

/// ln 2 in two parts (n ln 2 exact in the first for the n of f32's range), and the coefficients,
/// highest first, of p with e^r = 1 + r + r² p(r) on [-ln 2 / 2, ln 2 / 2]: [`exp_generic`]'s.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];

/// The coefficients, highest first, of p with 2^f = 1 + f p(f) on [0, 1] (a relative-error
/// minimax fit: within 8.3e-8 in exact arithmetic, 1.5e-7 in f32 with fused multiply-adds), and
/// the exponent below which [`exp2_generic`] and the AVX-512 rows give exactly 0 (2^-126 is f32's
/// smallest normal).
const EXP2_POLY: [f32; 5] = [
    1.867_130_2e-3,
    9.017_03e-3,
    5.579_991_3e-2,
    2.401_644_4e-1,
    6.931_513e-1,
];
const EXP2_LOWEST: f32 = -126.0;

/// `2^t` element-wise for t <= 128: 2^n · (1 + f p(f)) with n = floor(t) (or floor(t) - 1 at an
/// integer t, where f = 1) and f = t - n, exactly 0 below [`EXP2_LOWEST`] and for NaN. The floor
/// is taken from the bits of a rounding sum of t - 1/2 so that no float-to-int conversion stops
/// the loop from vectorising.
#[inline(always)]
fn exp2_generic(ts: &mut [f32]) {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    for t in ts.iter_mut() {
        let v = t.max(EXP2_LOWEST); // NaN becomes EXP2_LOWEST here, 0 below
        let r = (v - 0.5) + ROUND;
        let n = r - ROUND;
        let f = v - n;
        let mut y = EXP2_POLY[0];
        for k in &EXP2_POLY[1..] {
            y = y.mul_add(f, *k);
        }
        y = y.mul_add(f, 1.0);
        let pow2 = (r.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23;
        *t = if *t >= EXP2_LOWEST {
            y * f32::from_bits(pow2)
        } else {
            0.0
        };
    }
}

/// `e^x` element-wise, to about 2 ulp of f32 for x in [-87, 88] (0 below, e^88 above): 2^n · poly(r) with
/// n = round(x / ln 2), the integer taken from the bits of the rounding sum so that no float-to-int
/// conversion stops the loop from vectorising.
#[inline(always)]
pub(crate) fn exp_generic(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    for x in xs.iter_mut() {
        let v = x.clamp(-87.0, 88.0);
        let t = v * LOG2E + ROUND;
        let n = t - ROUND;
        let r = v - n * LN2_HI - n * LN2_LO;
        let mut y = EXP_POLY[0];
        for k in &EXP_POLY[1..] {
            y = y * r + k;
        }
        y = y * r * r + r + 1.0;
        let pow2 = (t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23;
        // Below -87 exactly 0 (e^-87 is near f32's smallest normal): a masked score's weight is
        // then 0, as torch's, not a subnormal that slows every product it enters (4x a language
        // model's causal attention, whose scores are half masked).
        *x = if *x < -87.0 {
            0.0
        } else {
            y * f32::from_bits(pow2)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maximum in intrinsics equals the generic one, NaNs passed over, for lengths around the
    /// four-vector rounds and the masked tail.
    #[test]
    fn row_max_avx512_equals_row_max() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let mut seed = 3u64;
        for len in [1, 15, 16, 17, 63, 64, 65, 130, 1357] {
            let mut s = random(len, &mut seed);
            for nan in [None, Some(0), Some(len / 2), Some(len - 1)] {
                if let Some(k) = nan {
                    s[k] = f32::NAN;
                }
                // SAFETY: the CPU has AVX-512F (checked above).
                let got = unsafe { row_max_avx512(&s) };
                assert_eq!(
                    got.to_bits(),
                    row_max(&s).to_bits(),
                    "len {len}, NaN at {nan:?}"
                );
            }
        }
    }

    /// The AVX512-BF16 exponentials of a row against the generic loop's: every bf16 value within
    /// one bf16 step, nearly all equal, and the same sum, over lengths with and without a tail and
    /// scores from -inf to 0 after the shift (masked scores, values about -87).
    #[test]
    fn exp_row_avx512_bf16_equals_the_generic_row() {
        if !crate::cpu::test_has("avx512_bf16") {
            return;
        }
        let mut seed = 7u64;
        let (mut differ, mut total) = (0, 0);
        for (len, spread) in [
            (1, 1.0),
            (15, 3.0),
            (16, 10.0),
            (64, 30.0),
            (1357, 60.0),
            (1000, 95.0),
        ] {
            let mut s: Vec<f32> = random(len, &mut seed).iter().map(|v| v * spread).collect();
            if len > 20 {
                s[3] = f32::NEG_INFINITY;
                s[7] = s[0] - 87.0 / 0.125;
            }
            let (mut want, mut got) = (vec![bf16::ZERO; len], vec![bf16::ZERO; len]);
            let a = exp_row_generic(&s, &mut want, 0.125);
            // SAFETY: the CPU has AVX512-BF16 (checked above).
            let b = unsafe { exp_row_avx512_bf16(&s, &mut got, 0.125) };
            assert!((a - b).abs() <= 1e-5 * a, "len {len}: 1/sum {a} vs {b}");
            for (w, g) in want.iter().zip(&got) {
                let step = (w.to_bits() as i32 - g.to_bits() as i32).abs();
                assert!(step <= 1, "len {len}: {w} vs {g}");
                differ += (step > 0) as usize;
                total += 1;
            }
        }
        assert!(differ * 100 <= total, "{differ} of {total} values differ");
    }

    /// The base-2 exponentials within 1.5e-7 of 2^t (relative), 0 exactly below 2^-126 and for
    /// NaN, and the AVX-512 rows' exponentials (before their rounding to bf16: the 1 / sum of a
    /// row of one value) the same.
    #[test]
    fn exp2_is_accurate() {
        let ts: Vec<f32> = (0..200_000)
            .map(|i| -130.0 + i as f32 * 0.000_65)
            .chain([0.0, -1.0, -2.0, -125.0, -126.0, f32::NEG_INFINITY, f32::NAN])
            .collect();
        let mut got = ts.clone();
        exp2_generic(&mut got);
        for (&t, &g) in ts.iter().zip(&got) {
            if t.is_nan() || t < EXP2_LOWEST {
                assert_eq!(g.to_bits(), 0, "2^{t} = {g}");
                continue;
            }
            let want = (t as f64).exp2();
            assert!(
                ((g as f64) - want).abs() <= 1.5e-7 * want,
                "2^{t}: {g} vs {want}"
            );
        }
        if !crate::cpu::test_has("avx512_bf16") {
            return;
        }
        // One score s against a maximum of 0 with scale 1: 1 / sum = 1 / 2^(s log2 e) when s is
        // the row's only value but the maximum; two values [0, s] give 1 / (1 + e^s).
        for i in 0..2000 {
            let x = -60.0 + i as f32 * 0.03;
            let mut p = [bf16::ZERO; 2];
            // SAFETY: the CPU has AVX512-BF16 (checked above).
            let inv = unsafe { exp_row_avx512_bf16(&[0.0, x], &mut p, 1.0) };
            let want = 1.0 / (1.0 + (x as f64).exp());
            assert!(
                ((inv as f64) - want).abs() <= 3e-7 * want,
                "e^{x}: 1/sum {inv} vs {want}"
            );
            assert_eq!(p[0], bf16::ONE);
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut xs: Vec<f32> = (0..40000).map(|i| -80.0 + i as f32 * 0.004).collect();
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_generic(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!((g - w).abs() <= 3.0 * f32::EPSILON * w, "{g} vs {w}");
        }
    }

    /// `softmax(q kᵀ · scale) v` in f64, (bh, n, d).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        bh: usize,
        n: usize,
        m: usize,
        d: usize,
        scale: f64,
        bias: Option<(&[f64], usize)>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; bh * n * d];
        for i in 0..bh {
            for r in 0..n {
                let qi = &q[(i * n + r) * d..][..d];
                let s: Vec<f64> = (0..m)
                    .map(|j| {
                        let kj = &k[(i * m + j) * d..][..d];
                        let b = bias.map_or(0.0, |(b, h)| b[((i % h) * n + r) * m + j]);
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale + b
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(i * n + r) * d + c] =
                        (0..m).map(|j| e[j] / z * v[(i * m + j) * d + c]).sum();
                }
            }
        }
        out
    }

    fn random(len: usize, seed: &mut u64) -> Vec<f32> {
        crate::cpu::lcg_uniform(len, seed, -3.0, 3.0)
    }

    const SHAPES: [(usize, usize, usize, usize); 3] =
        [(3, 70, 45, 24), (2, 130, 200, 64), (1, 5, 300, 40)];

    /// Runs `sdpa` on random inputs of element type T for each of the shapes and checks every
    /// output within `tol(|reference|)` of an f64 reference on the same (rounded) inputs.
    #[allow(clippy::type_complexity)]
    fn check_against_reference<T: Copy + std::fmt::Debug>(
        mut seed: u64,
        from: fn(f32) -> T,
        to: fn(T) -> f64,
        sdpa: fn(&[T], &[T], &[T], Heads, f32) -> Vec<T>,
        tol: fn(f64) -> f64,
    ) {
        for &(bh, n, m, d) in &SHAPES {
            let mut rnd =
                |len| -> Vec<T> { random(len, &mut seed).into_iter().map(from).collect() };
            let (q, k, v) = (rnd(bh * n * d), rnd(bh * m * d), rnd(bh * m * d));
            let scale = 1.0 / (d as f32).sqrt();
            let got = sdpa(&q, &k, &v, Heads { bh, n, m, d }, scale);
            let f = |x: &[T]| x.iter().map(|&v| to(v)).collect::<Vec<_>>();
            let want = reference(&f(&q), &f(&k), &f(&v), bh, n, m, d, scale as f64, None);
            for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (to(g) - w).abs() <= tol(w.abs()),
                    "({bh},{n},{m},{d}) [{i}]: {g:?} vs {w}"
                );
            }
        }
    }

    /// Against an f64 reference of the same bf16 inputs: within bf16 rounding of the probabilities
    /// (2^-9 relative each, |v| <= 3) and of the output.
    #[test]
    fn sdpa_bf16_equals_the_reference() {
        if crate::cpu::test_has("amx") {
            let tol = |w: f64| 3.0 * 2f64.powi(-8) + w * 2f64.powi(-8);
            check_against_reference(7, bf16::from_f32, |v| v.to_f64(), sdpa_bf16, tol);
        }
    }

    /// As [`sdpa_bf16_equals_the_reference`], on AVX512-BF16 dot products.
    #[test]
    fn sdpa_dpbf16_equals_the_reference() {
        if crate::cpu::test_has("avx512_bf16") {
            let tol = |w: f64| 3.0 * 2f64.powi(-8) + w * 2f64.powi(-8);
            check_against_reference(7, bf16::from_f32, |v| v.to_f64(), sdpa_dpbf16, tol);
        }
    }

    /// Against an f64 reference of the same f32 inputs: within f32 summation error.
    #[test]
    fn sdpa_f32_equals_the_reference() {
        if crate::cpu::test_has("avx512") {
            check_against_reference(9, |v| v, |v| v as f64, sdpa_f32, |_| 2e-5);
        }
    }

    /// On the `gemm` crate (every CPU): f32 within f32 summation error of the f64 reference, with
    /// and without T5's bias and key mask; bf16 the f32 attention of the widened inputs rounded
    /// once, bit for bit, with and without a causal mask of -inf.
    #[test]
    fn sdpa_gemm_equals_the_reference() {
        check_against_reference(
            9,
            |v| v,
            |v| v as f64,
            |q, k, v, h, s| sdpa_gemm(q, k, v, h, s, None),
            |_| 2e-5,
        );
        let mut seed = 13;
        // Two query blocks and a partial one, besides the shared shapes.
        for &(bh, n, m, d) in SHAPES.iter().chain(&[(2, 2 * QB_GEMM + 9, 150, 64)]) {
            let heads = Heads { bh, n, m, d };
            let scale = 1.0 / (d as f32).sqrt();
            let (q, k, v) = (
                random(bh * n * d, &mut seed),
                random(bh * m * d, &mut seed),
                random(bh * m * d, &mut seed),
            );
            let h = if bh > 1 { bh / 2 } else { 1 };
            let valid = m - m / 3;
            let mut bias = random(h * n * m, &mut seed);
            for (j, b) in bias.iter_mut().enumerate() {
                if j % m >= valid {
                    *b += f32::MIN;
                }
            }
            let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let b = f(&bias);
            let want = reference(
                &f(&q),
                &f(&k),
                &f(&v),
                bh,
                n,
                m,
                d,
                scale as f64,
                Some((&b, h)),
            );
            let got = sdpa_gemm(&q, &k, &v, heads, scale, Some(&bias));
            for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 2e-5,
                    "({bh},{n},{m},{d}) biased [{i}]: {g} vs {w}"
                );
            }
            let bf = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
            let (qb, kb, vb) = (bf(&q), bf(&k), bf(&v));
            let wide = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            let bits = |o: Vec<bf16>| o.into_iter().map(bf16::to_bits).collect::<Vec<u16>>();
            let rounded = |o: Vec<f32>| bits(o.into_iter().map(bf16::from_f32).collect());
            let seen = |i: usize, j: usize| j + n <= i + m.max(n);
            let mask: Vec<f32> = (0..n * m)
                .map(|ij| match seen(ij / m, ij % m) {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
                .collect();
            for mask in [None, Some(&mask[..])] {
                let want = rounded(sdpa_gemm(
                    &wide(&qb),
                    &wide(&kb),
                    &wide(&vb),
                    heads,
                    scale,
                    mask,
                ));
                assert_eq!(
                    bits(sdpa_gemm(&qb, &kb, &vb, heads, scale, mask)),
                    want,
                    "({bh},{n},{m},{d})"
                );
            }
        }
    }

    /// bf16 on the f32 kernel: the f32 attention of the widened inputs, rounded once, bit for bit;
    /// without a bias and with a causal mask of -inf (a language model's), under which hidden keys'
    /// values have no effect (their weights exactly 0: e^x is exactly 0 below -87).
    #[test]
    fn sdpa_widened_equals_sdpa_f32_of_the_widened_inputs_rounded() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let mut seed = 11;
        for &(bh, n, m, d) in &SHAPES {
            let mut rnd = |len| -> Vec<bf16> {
                random(len, &mut seed)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            };
            let (q, k, mut v) = (rnd(bh * n * d), rnd(bh * m * d), rnd(bh * m * d));
            let (heads, scale) = (Heads { bh, n, m, d }, 1.0 / (d as f32).sqrt());
            let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            let bits = |o: Vec<bf16>| o.into_iter().map(bf16::to_bits).collect::<Vec<u16>>();
            let rounded = |o: Vec<f32>| bits(o.into_iter().map(bf16::from_f32).collect());
            let want = rounded(sdpa_f32(&f(&q), &f(&k), &f(&v), heads, scale));
            assert_eq!(bits(sdpa_widened(&q, &k, &v, heads, scale)), want);
            // Query i sees keys j <= i + m - n (every row at least key 0).
            let seen = |i: usize, j: usize| j + n <= i + m.max(n);
            let mask: Vec<f32> = (0..n * m)
                .map(|ij| match seen(ij / m, ij % m) {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
                .collect();
            let want = rounded(sdpa_f32_biased(&f(&q), &f(&k), &f(&v), heads, scale, &mask));
            let got = bits(sdpa_widened_biased(&q, &k, &v, heads, scale, &mask));
            assert_eq!(got, want, "({bh},{n},{m},{d}) masked");
            // The values of every key hidden from query 0 changed: its outputs stay as they were.
            for (j, x) in v.iter_mut().enumerate() {
                if !seen(0, (j / d) % m) {
                    *x = bf16::from_f32(1e4);
                }
            }
            let again = bits(sdpa_widened_biased(&q, &k, &v, heads, scale, &mask));
            for (i, (a, b)) in again.iter().zip(&got).enumerate() {
                if (i / d) % n == 0 {
                    assert_eq!(a, b, "({bh},{n},{m},{d}) query 0 saw a hidden key");
                }
            }
        }
        let mut xs = [-87.5f32, -100.0, f32::MIN, f32::NEG_INFINITY, -86.0];
        exp_generic(&mut xs);
        assert_eq!(xs[..4], [0.0; 4]);
        assert!(xs[4] > 0.0);
    }

    type BiasedBf16 = fn(&[bf16], &[bf16], &[bf16], Heads, f32, &[f32]) -> Vec<bf16>;

    /// A biased bf16 attention against the f64 reference of the same bf16 inputs and f32 bias,
    /// per head (h = bh) and broadcast (h = 1), with keys hidden by f32::MIN (T5's mask) and by
    /// -inf (a language model's): within bf16 rounding of the probabilities and of the output, and
    /// the hidden keys' values without effect.
    fn check_bf16_biased(sdpa: BiasedBf16) {
        let mut seed = 13;
        let tol = |w: f64| 3.0 * 2f64.powi(-8) + w * 2f64.powi(-8);
        for &(bh, n, m, d) in &SHAPES {
            for (h, hidden) in [(1, f32::MIN), (bh, f32::NEG_INFINITY)] {
                let mut rnd = |len| -> Vec<bf16> {
                    random(len, &mut seed)
                        .into_iter()
                        .map(bf16::from_f32)
                        .collect()
                };
                let (q, k, mut v) = (rnd(bh * n * d), rnd(bh * m * d), rnd(bh * m * d));
                let valid = m - m / 3;
                let mut bias = random(h * n * m, &mut seed);
                for (j, b) in bias.iter_mut().enumerate() {
                    if j % m >= valid {
                        *b = hidden;
                    }
                }
                let (heads, scale) = (Heads { bh, n, m, d }, 1.0 / (d as f32).sqrt());
                let got = sdpa(&q, &k, &v, heads, scale, &bias);
                let f = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
                let b: Vec<f64> = bias.iter().map(|&x| x as f64).collect();
                let want = reference(
                    &f(&q),
                    &f(&k),
                    &f(&v),
                    bh,
                    n,
                    m,
                    d,
                    scale as f64,
                    Some((&b, h)),
                );
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g.to_f64() - w).abs() <= tol(w.abs()),
                        "({bh},{n},{m},{d}) h {h} [{i}]: {g} vs {w}"
                    );
                }
                for (j, x) in v.iter_mut().enumerate() {
                    if (j / d) % m >= valid {
                        *x = bf16::from_f32(1e4);
                    }
                }
                assert_eq!(got, sdpa(&q, &k, &v, heads, scale, &bias));
            }
        }
    }

    #[test]
    fn sdpa_bf16_biased_equals_the_reference() {
        if crate::cpu::test_has("amx") {
            check_bf16_biased(sdpa_bf16_biased);
        }
    }

    #[test]
    fn sdpa_dpbf16_biased_equals_the_reference() {
        if crate::cpu::test_has("avx512_bf16") {
            check_bf16_biased(sdpa_dpbf16_biased);
        }
    }

    /// With a bias per head, broadcast over the batch, and keys masked by f32::MIN (T5's): within
    /// f32 summation error of the f64 reference, and the masked keys' values without effect.
    #[test]
    fn sdpa_f32_biased_equals_the_reference() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let mut seed = 11;
        for &(bh, n, m, d) in &SHAPES {
            for h in [1, bh] {
                let (q, k, mut v) = (
                    random(bh * n * d, &mut seed),
                    random(bh * m * d, &mut seed),
                    random(bh * m * d, &mut seed),
                );
                let valid = m - m / 3;
                let mut bias = random(h * n * m, &mut seed);
                for (j, b) in bias.iter_mut().enumerate() {
                    if j % m >= valid {
                        *b += f32::MIN;
                    }
                }
                let heads = Heads { bh, n, m, d };
                let scale = 1.0 / (d as f32).sqrt();
                let got = sdpa_f32_biased(&q, &k, &v, heads, scale, &bias);
                let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                let b = f(&bias);
                let want = reference(
                    &f(&q),
                    &f(&k),
                    &f(&v),
                    bh,
                    n,
                    m,
                    d,
                    scale as f64,
                    Some((&b, h)),
                );
                for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 2e-5,
                        "({bh},{n},{m},{d}) h {h} [{i}]: {g} vs {w}"
                    );
                }
                // Masked keys' values change nothing.
                for (j, x) in v.iter_mut().enumerate() {
                    if (j / d) % m >= valid {
                        *x = 1e6;
                    }
                }
                assert_eq!(got, sdpa_f32_biased(&q, &k, &v, heads, scale, &bias));
            }
        }
    }
}
