//! Vectorised element-wise passes on CPU tensors: tanh-GELU (f32, and bf16 computed in f32 and
//! rounded once), and the LayerNorm + modulation, RMSNorm, gated residual and add over a batch in
//! f32 or bf16 with the roundings of the composed ops in that dtype ([`Lane`]). Each has a generic
//! body that compiles to AVX-512, or else AVX2, where the feature switch allows it
//! ([`vector_dispatch`](super::vector_dispatch)).

use super::{lane_sum, par_new, round_bf16, with_slice, Lane};
use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

/// tanh-approximated GELU of a bf16 CPU tensor, computed in f32 and rounded once (as PyTorch does
/// for bf16): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_bf16(x: &Tensor) -> Result<Tensor> {
    passes_with(x, |x: &[bf16], o: &mut [bf16], buf: &mut [f32]| {
        let (xf, e) = buf.split_at_mut(x.len());
        for (f, v) in xf.iter_mut().zip(x) {
            *f = v.to_f32();
        }
        gelu_bf16_chunk(xf, e, o)
    })
}

/// tanh-approximated GELU of an f32 CPU tensor, vectorised (candle's is a scalar `tanh` per element).
pub fn gelu_tanh_f32(x: &Tensor) -> Result<Tensor> {
    passes_with(x, |x: &[f32], o: &mut [f32], buf: &mut [f32]| {
        gelu_f32_chunk(x, &mut buf[..x.len()], o)
    })
}

/// Runs `chunk(x, out, scratch of 2 x len f32)` over a CPU tensor in parallel pieces (the GELUs'
/// and CLIP's activations' passes).
fn passes_with<T: candle_core::WithDType>(
    x: &Tensor,
    chunk: impl Fn(&[T], &mut [T], &mut [f32]) + Sync,
) -> Result<Tensor> {
    const CHUNK: usize = 4096;
    let out = with_slice::<T, _>(x, |xs| {
        let scratch = || vec![0f32; 2 * CHUNK];
        par_new(xs.len(), CHUNK, T::zero(), scratch, |buf, i, o| {
            let x = &xs[i * CHUNK..][..o.len()];
            chunk(x, o, &mut buf[..2 * o.len()]);
        })
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

super::vector_dispatch!(gelu_bf16_chunk_vectorised, gelu_bf16_chunk_generic, (x: &[f32], e: &mut [f32], o: &mut [bf16]));
super::vector_dispatch!(gelu_f32_chunk_vectorised, gelu_f32_chunk_generic, (x: &[f32], e: &mut [f32], o: &mut [f32]));

/// `o` = the tanh-GELU of `x` rounded to bf16 (`e`: scratch of x's length): on AVX-512 through
/// [`gelu_tanh16`], elsewhere [`gelu_tanh_in`] as the compiler vectorises it.
pub(crate) fn gelu_bf16_chunk(x: &[f32], e: &mut [f32], o: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: the feature switch reports AVX-512F only where the CPU has it.
        return unsafe { gelu_bf16_chunk_avx512(x, e, o) };
    }
    gelu_bf16_chunk_vectorised(x, e, o)
}

/// [`gelu_bf16_chunk`] in f32.
pub(crate) fn gelu_f32_chunk(x: &[f32], e: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: the feature switch reports AVX-512F only where the CPU has it.
        return unsafe { gelu_tanh_avx512(x, o) };
    }
    gelu_f32_chunk_vectorised(x, e, o)
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_bf16_chunk_avx512(x: &[f32], e: &mut [f32], o: &mut [bf16]) {
    // SAFETY: AVX-512F is enabled here.
    unsafe { gelu_tanh_avx512(x, e) };
    for (o, &g) in o.iter_mut().zip(e.iter()) {
        *o = round_bf16(g);
    }
}

/// `e = gelu_tanh(x)` 16 lanes at a time ([`gelu_tanh16`]), the tail masked.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh_avx512(x: &[f32], e: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(e.len());
    let mut i = 0;
    // SAFETY: every load and store covers lanes i .. i + 16 of x and e under a mask that keeps
    // them below n (full vectors while i + 16 <= n); AVX-512F is enabled here.
    unsafe {
        while i + 16 <= n {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            _mm512_storeu_ps(e.as_mut_ptr().add(i), gelu_tanh16(v));
            i += 16;
        }
        if i < n {
            let mask = super::low_lanes(n - i);
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(e.as_mut_ptr().add(i), mask, gelu_tanh16(v));
        }
    }
}

/// The tanh-GELU of 16 lanes on AVX-512F, for the passes above and for a product's output tile
/// before it is stored ([`super::sgemm::matmul_gelu`], so each value is the one
/// [`gelu_tanh_f32`] computes): [`gelu_tanh_in`]'s `0.5 v (1 + tanh(u))` with tanh(u) = 1 - 2 /
/// (e^(2u) + 1), e^(2u) taken as `2^(v (K + K A v²))` (K = 2 sqrt(2/pi) log2(e), A = 0.044715;
/// the attention's base-2 exponential, [`super::attention::exp2_of_parts16`]) and 2 / (e + 1)
/// from `vrcp14ps` and one Newton step instead of a division (which bounded the pass): within a
/// few f32 ulps of the generic formula (`gelu_f32_equals_candles`).
///
/// # Safety
/// AVX-512F available (it inlines into a caller compiled with it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn gelu_tanh16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const K: f32 = 2.0 * 0.797_884_6 * std::f32::consts::LOG2_E;
    // SAFETY: AVX-512F is available (# Safety); the operations touch no memory.
    unsafe {
        let c = _mm512_set1_ps;
        let v2 = _mm512_mul_ps(v, v);
        // The exponent, at most 64: beyond it 2 / (e + 1) < 2^-63 and tanh is 1 in f32 (and the
        // reciprocal's Newton step stays finite).
        let t = _mm512_mul_ps(v, _mm512_fmadd_ps(v2, c(K * 0.044715), c(K)));
        let t = _mm512_min_ps(t, c(64.0));
        let floor = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
        let e = super::attention::exp2_of_parts16(t, _mm512_sub_ps(t, floor), 0xffff);
        let d = _mm512_add_ps(e, c(1.0));
        let r = _mm512_rcp14_ps(d);
        let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, c(1.0)), r);
        let tanh = _mm512_fnmadd_ps(c(2.0), r, c(1.0));
        _mm512_mul_ps(_mm512_mul_ps(c(0.5), v), _mm512_add_ps(c(1.0), tanh))
    }
}

#[inline(always)]
fn gelu_bf16_chunk_generic(x: &[f32], e: &mut [f32], o: &mut [bf16]) {
    gelu_tanh_in(x, e);
    for (o, &g) in o.iter_mut().zip(e.iter()) {
        *o = round_bf16(g);
    }
}

#[inline(always)]
fn gelu_f32_chunk_generic(x: &[f32], e: &mut [f32], o: &mut [f32]) {
    gelu_tanh_in(x, e);
    o.copy_from_slice(e);
}

/// `e = gelu_tanh(x)` in f32, with tanh(u) = 1 - 2 / (e^(2u) + 1).
#[inline(always)]
fn gelu_tanh_in(x: &[f32], e: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for (e, &v) in e.iter_mut().zip(x) {
        *e = 2.0 * C * (v + 0.044715 * v * v * v);
    }
    super::attention::exp_generic(e);
    for (e, &v) in e.iter_mut().zip(x) {
        let t = 1.0 - 2.0 / (*e + 1.0);
        *e = 0.5 * v * (1.0 + t);
    }
}

/// T5 v1.1's gated feed-forward activation `gelu_new(gate) * up` for bf16 CPU tensors of one
/// shape, with the roundings of candle's bf16 ops (and of transformers' `NewGELUActivation`
/// composed of bf16 ops): `0.5 v (1 + tanh(c v (1 + 0.044715 v v)))` with each operation rounded
/// to bf16 from left to right, the constants as bf16, then the product with `up` rounded. The only
/// difference from candle's op is tanh: vectorised, within 2 f32 ulps of libm's (so a rounding
/// to bf16 can differ, rarely, by one bf16 ulp).
pub fn gelu_new_mul_bf16(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "gelu_new_mul: shapes {:?} and {:?}",
            gate.shape(),
            up.shape()
        );
    }
    const CHUNK: usize = 4096;
    let up = up.contiguous()?;
    let out = with_slice::<bf16, _>(gate, |g| {
        with_slice::<bf16, _>(&up, |u| {
            let scratch = || vec![0f32; 2 * CHUNK];
            par_new(g.len(), CHUNK, bf16::ZERO, scratch, |buf, i, o| {
                let (g, u) = (&g[i * CHUNK..][..o.len()], &u[i * CHUNK..][..o.len()]);
                let (v, t) = buf[..2 * o.len()].split_at_mut(o.len());
                gelu_new_mul_chunk(g, u, v, t, o)
            })
        })
    })??;
    Tensor::from_vec(out, gate.shape(), &Device::Cpu)
}

super::vector_dispatch!(gelu_new_mul_chunk, gelu_new_mul_chunk_generic, (g: &[bf16], u: &[bf16], v: &mut [f32], t: &mut [f32], o: &mut [bf16]));

#[inline(always)]
fn gelu_new_mul_chunk_generic(
    g: &[bf16],
    u: &[bf16],
    v: &mut [f32],
    t: &mut [f32],
    o: &mut [bf16],
) {
    // x rounded to bf16 and back (the result of one bf16 operation).
    let r = |x: f32| round_bf16(x).to_f32();
    let c = bf16::from_f32_const(0.797_884_6).to_f32(); // sqrt(2 / pi), as candle's constant
    let a = bf16::from_f32_const(0.044715).to_f32();
    for ((v, t), g) in v.iter_mut().zip(t.iter_mut()).zip(g) {
        *v = g.to_f32();
        let inner = r(1.0 + r(r(a * *v) * *v));
        *t = r(r(c * *v) * inner);
    }
    tanh_in(t);
    for (((o, &v), &t), u) in o.iter_mut().zip(v.iter()).zip(t.iter()).zip(u) {
        let gelu = r(r(0.5 * v) * r(1.0 + r(t)));
        *o = round_bf16(gelu * u.to_f32());
    }
}

/// `x = tanh(x)` in f32, vectorisable: Cephes' odd polynomial below 0.625 in magnitude, else
/// `1 - 2 / (e^(2|x|) + 1)` with x's sign; within 2 ulps of libm's.
#[inline(always)]
fn tanh_in(xs: &mut [f32]) {
    let mut e = [0f32; 64];
    for chunk in xs.chunks_mut(64) {
        let e = &mut e[..chunk.len()];
        for (e, &x) in e.iter_mut().zip(chunk.iter()) {
            *e = 2.0 * x.abs();
        }
        super::attention::exp_generic(e);
        for (x, &e) in chunk.iter_mut().zip(e.iter()) {
            let z = *x * *x;
            let mut p = -5.704_988_7e-3_f32;
            p = p * z + 2.063_909e-2;
            p = p * z - 5.373_971_6e-2;
            p = p * z + 1.333_144_2e-1;
            p = p * z - 3.333_328e-1;
            let small = *x + *x * z * p;
            let large = (1.0 - 2.0 / (e + 1.0)).copysign(*x);
            *x = if x.abs() < 0.625 { small } else { large };
        }
    }
}

/// Per-sample vectors (b, d) of a bf16 or f32 tensor as f32 rows.
fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_dtype(candle_core::DType::F32)?.to_vec2()
}

/// `modulate(layer_norm(x), shift, scale)` for f32 or bf16 CPU tensors in one parallel pass, with
/// the roundings of the composed ops in x's dtype (and of PyTorch's): the norm (f32 statistics),
/// `1 + scale`, the product and the sum each rounded to the dtype. x: (b, n, d); shift, scale: (b, d).
pub fn norm_modulate(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => norm_modulate_as::<f32>(x, eps, shift, scale),
        DType::BF16 => norm_modulate_as::<bf16>(x, eps, shift, scale),
        dtype => candle_core::bail!("norm_modulate on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

fn norm_modulate_as<E: RowPasses>(
    x: &Tensor,
    eps: f64,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let beta = rows_f32(shift)?;
    let alpha: Vec<Vec<f32>> = rows_f32(scale)?
        .into_iter()
        .map(|r| r.into_iter().map(|s| E::round(s + 1.0)).collect())
        .collect();
    if beta.len() != b || alpha.len() != b || beta.iter().chain(&alpha).any(|r| r.len() != d) {
        candle_core::bail!(
            "norm_modulate: x {:?}, shift {:?}, scale {:?}",
            x.shape(),
            shift.shape(),
            scale.shape()
        );
    }
    let out = with_slice::<E, _>(x, |xs| {
        par_new(
            xs.len(),
            d,
            E::zero(),
            || vec![0f32; d],
            |buf, row, o| {
                let (x, i) = (&xs[row * d..][..d], row / n.max(1));
                E::ln_mod_row(x, o, &alpha[i], &beta[i], eps as f32, buf)
            },
        )
    })?;
    Tensor::from_vec(out, (b, n, d), &Device::Cpu)
}

/// The row passes of each element type, compiled for AVX-512 where the feature switch allows it.
pub(crate) trait RowPasses: Lane {
    fn ln_mod_row(
        x: &[Self],
        o: &mut [Self],
        alpha: &[f32],
        beta: &[f32],
        eps: f32,
        buf: &mut [f32],
    );
    fn rms_row(x: &[Self], o: &mut [Self], w: &[f32], eps: f32);
    fn add_gated_row(x: &[Self], y: &[Self], g: &[f32], o: &mut [Self]);
    fn add_row(x: &[Self], y: &[Self], o: &mut [Self]);
    fn silu_mul_row(a: &[Self], b: &[Self], o: &mut [Self], e: &mut [f32]);
    fn quick_gelu_row(x: &[Self], o: &mut [Self], e: &mut [f32]);
    fn gelu_erf_row(x: &[Self], o: &mut [Self], e: &mut [f32]);
}

/// [`RowPasses`] for one element type, each method dispatched to its generic body.
macro_rules! row_passes_for {
    ($t:ty, $ln:ident, $rms:ident, $gate:ident, $add:ident, $silu:ident, $quick:ident, $erf:ident) => {
        super::vector_dispatch!($ln, ln_mod_row_generic::<$t>, (x: &[$t], o: &mut [$t], alpha: &[f32], beta: &[f32], eps: f32, buf: &mut [f32]));
        super::vector_dispatch!($rms, rms_row_generic::<$t>, (x: &[$t], o: &mut [$t], w: &[f32], eps: f32));
        super::vector_dispatch!($gate, add_gated_row_generic::<$t>, (x: &[$t], y: &[$t], g: &[f32], o: &mut [$t]));
        super::vector_dispatch!($add, add_row_generic::<$t>, (x: &[$t], y: &[$t], o: &mut [$t]));
        super::vector_dispatch!($silu, silu_mul_row_generic::<$t>, (a: &[$t], b: &[$t], o: &mut [$t], e: &mut [f32]));
        super::vector_dispatch!($quick, quick_gelu_row_generic::<$t>, (x: &[$t], o: &mut [$t], e: &mut [f32]));
        super::vector_dispatch!($erf, gelu_erf_row_generic::<$t>, (x: &[$t], o: &mut [$t], e: &mut [f32]));
        impl RowPasses for $t {
            fn ln_mod_row(x: &[Self], o: &mut [Self], alpha: &[f32], beta: &[f32], eps: f32, buf: &mut [f32]) {
                $ln(x, o, alpha, beta, eps, buf)
            }
            fn rms_row(x: &[Self], o: &mut [Self], w: &[f32], eps: f32) {
                $rms(x, o, w, eps)
            }
            fn add_gated_row(x: &[Self], y: &[Self], g: &[f32], o: &mut [Self]) {
                $gate(x, y, g, o)
            }
            fn add_row(x: &[Self], y: &[Self], o: &mut [Self]) {
                $add(x, y, o)
            }
            fn silu_mul_row(a: &[Self], b: &[Self], o: &mut [Self], e: &mut [f32]) {
                $silu(a, b, o, e)
            }
            fn quick_gelu_row(x: &[Self], o: &mut [Self], e: &mut [f32]) {
                $quick(x, o, e)
            }
            fn gelu_erf_row(x: &[Self], o: &mut [Self], e: &mut [f32]) {
                $erf(x, o, e)
            }
        }
    };
}
row_passes_for!(
    f32,
    ln_mod_row_f32,
    rms_row_f32,
    add_gated_row_f32,
    add_row_f32,
    silu_mul_row_f32,
    quick_gelu_row_f32,
    gelu_erf_row_f32
);
row_passes_for!(
    bf16,
    ln_mod_row_bf16,
    rms_row_bf16,
    add_gated_row_bf16,
    add_row_bf16,
    silu_mul_row_bf16,
    quick_gelu_row_bf16,
    gelu_erf_row_bf16
);

#[inline(always)]
fn ln_mod_row_generic<E: Lane>(
    x: &[E],
    o: &mut [E],
    alpha: &[f32],
    beta: &[f32],
    eps: f32,
    buf: &mut [f32],
) {
    let d = x.len() as f32;
    for (f, v) in buf.iter_mut().zip(x) {
        *f = v.widen();
    }
    let mean = lane_sum(buf, |v| v) / d;
    for f in buf.iter_mut() {
        *f -= mean;
    }
    let var = lane_sum(buf, |v| v * v) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &a), &b) in o.iter_mut().zip(buf.iter()).zip(alpha).zip(beta) {
        let normed = E::round(v * inv);
        let scaled = E::round(normed * a);
        *o = E::narrow(scaled + b);
    }
}

/// diffusers' `RMSNorm` for f32 or bf16 CPU tensors over the last dim, with its roundings: `x /
/// rms(x)` in f32 rounded to the dtype, then times the weight, rounded.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => rms_norm_as::<f32>(x, weight, eps),
        DType::BF16 => rms_norm_as::<bf16>(x, weight, eps),
        dtype => candle_core::bail!("rms_norm on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

fn rms_norm_as<E: RowPasses>(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let w: Vec<f32> = weight.to_dtype(DType::F32)?.to_vec1()?;
    if w.len() != d {
        candle_core::bail!("rms_norm: x {:?}, weight {:?}", x.shape(), weight.shape());
    }
    let out = with_slice::<E, _>(x, |xs| {
        par_new(
            xs.len(),
            d * 64,
            E::zero(),
            || (),
            |_, i, o| {
                let x = &xs[i * d * 64..][..o.len()];
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    E::rms_row(x, o, &w, eps as f32)
                }
            },
        )
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

#[inline(always)]
fn rms_row_generic<E: Lane>(x: &[E], o: &mut [E], w: &[f32], eps: f32) {
    let sq = lane_sum(x, |v| v.widen() * v.widen());
    let inv = 1.0 / (sq / x.len() as f32 + eps).sqrt();
    for ((o, v), &w) in o.iter_mut().zip(x).zip(w) {
        *o = E::narrow(E::round(v.widen() * inv) * w);
    }
}

/// `x + gate * y` for f32 or bf16 CPU tensors of one dtype with a per-sample gate, in one parallel
/// pass, each operation rounded to the dtype. x, y: (b, n, d); gate: (b, d).
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if y.dtype() != x.dtype() {
        candle_core::bail!("add_gated: x {:?}, y {:?}", x.dtype(), y.dtype());
    }
    match x.dtype() {
        DType::F32 => add_gated_as::<f32>(x, y, gate),
        DType::BF16 => add_gated_as::<bf16>(x, y, gate),
        dtype => candle_core::bail!("add_gated on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

fn add_gated_as<E: RowPasses>(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let g = rows_f32(gate)?;
    if y.dims() != x.dims() || g.len() != b || g.iter().any(|r| r.len() != d) {
        candle_core::bail!(
            "add_gated: x {:?}, y {:?}, gate {:?}",
            x.shape(),
            y.shape(),
            gate.shape()
        );
    }
    let out = with_slice::<E, _>(x, |xs| {
        with_slice::<E, _>(y, |ys| {
            par_new(
                xs.len(),
                d,
                E::zero(),
                || (),
                |_, row, o| {
                    let (x, y) = (&xs[row * d..][..d], &ys[row * d..][..d]);
                    E::add_gated_row(x, y, &g[row / n.max(1)], o)
                },
            )
        })
    })??;
    Tensor::from_vec(out, (b, n, d), &Device::Cpu)
}

#[inline(always)]
fn add_gated_row_generic<E: Lane>(x: &[E], y: &[E], g: &[f32], o: &mut [E]) {
    for (((o, x), y), &g) in o.iter_mut().zip(x).zip(y).zip(g) {
        let t = E::round(y.widen() * g);
        *o = E::narrow(x.widen() + t);
    }
}

/// `x + y` for f32 or bf16 CPU tensors of one dtype, y broadcast over x's batch, in one parallel
/// pass, rounded once to the dtype. x: (b, n, d); y: (n, d) or (1, n, d).
pub fn add_over_batch(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    if y.dtype() != x.dtype() || y.elem_count() != n * d || y.dim(candle_core::D::Minus1)? != d {
        candle_core::bail!(
            "add_over_batch: x {:?} {:?}, y {:?} {:?}",
            x.shape(),
            x.dtype(),
            y.shape(),
            y.dtype()
        );
    }
    fn add<E: RowPasses>(
        x: &Tensor,
        y: &Tensor,
        (b, n, d): (usize, usize, usize),
    ) -> Result<Tensor> {
        let out = with_slice::<E, _>(x, |xs| {
            with_slice::<E, _>(y, |ys| {
                par_new(
                    xs.len(),
                    d,
                    E::zero(),
                    || (),
                    |_, row, o| {
                        let (x, y) = (&xs[row * d..][..d], &ys[(row % n) * d..][..d]);
                        E::add_row(x, y, o)
                    },
                )
            })
        })??;
        Tensor::from_vec(out, (b, n, d), &Device::Cpu)
    }
    match x.dtype() {
        DType::F32 => add::<f32>(x, y, (b, n, d)),
        DType::BF16 => add::<bf16>(x, y, (b, n, d)),
        dtype => candle_core::bail!("add_over_batch on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

#[inline(always)]
fn add_row_generic<E: Lane>(x: &[E], y: &[E], o: &mut [E]) {
    for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
        *o = E::narrow(x.widen() + y.widen());
    }
}

/// `silu(a) * b` for f32 or bf16 CPU tensors of one shape and dtype, in one parallel pass:
/// `a / (1 + e^-a)` in f32 rounded to the dtype (PyTorch's `silu`, one rounding), then the
/// product rounded. A language model's SwiGLU gate (`act(gate_proj(x)) * up_proj(x)`).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "silu_mul: a {:?} {:?}, b {:?} {:?}",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    let d = a.dim(candle_core::D::Minus1)?;
    fn run<E: RowPasses>(a: &Tensor, b: &Tensor, d: usize) -> Result<Vec<E>> {
        with_slice::<E, _>(a, |a| {
            with_slice::<E, _>(b, |b| {
                silu_mul_rows((a, d, 0), (b, d, 0), a.len() / d.max(1), d)
            })
        })?
    }
    match a.dtype() {
        DType::F32 => Tensor::from_vec(run::<f32>(a, b, d)?, a.shape(), &Device::Cpu),
        DType::BF16 => Tensor::from_vec(run::<bf16>(a, b, d)?, a.shape(), &Device::Cpu),
        dtype => candle_core::bail!("silu_mul on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

/// [`silu_mul`] of the two halves of x's last dim: `silu(x[.., ..h]) * x[.., h..]` (FLUX.2's
/// SwiGLU), without copying the halves out first. x: (.., 2h) -> (.., h).
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(candle_core::D::Minus1)?;
    if w % 2 != 0 {
        candle_core::bail!("swiglu: the last dim ({w}) is odd");
    }
    let h = w / 2;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = h;
    }
    fn run<E: RowPasses>(x: &Tensor, h: usize) -> Result<Vec<E>> {
        with_slice::<E, _>(x, |x| {
            silu_mul_rows((x, 2 * h, 0), (x, 2 * h, h), x.len() / (2 * h).max(1), h)
        })
    }
    match x.dtype() {
        DType::F32 => Tensor::from_vec(run::<f32>(x, h)?, shape, &Device::Cpu),
        DType::BF16 => Tensor::from_vec(run::<bf16>(x, h)?, shape, &Device::Cpu),
        dtype => candle_core::bail!("swiglu on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

/// `silu(a row) * b row` for `rows` rows of d, each operand given as (values, row stride, offset
/// of row 0), in parallel.
fn silu_mul_rows<E: RowPasses>(
    (a, sa, oa): (&[E], usize, usize),
    (b, sb, ob): (&[E], usize, usize),
    rows: usize,
    d: usize,
) -> Vec<E> {
    par_new(
        rows * d,
        d,
        E::zero(),
        || vec![0f32; d],
        |e, r, o| {
            let (a, b) = (&a[r * sa + oa..][..d], &b[r * sb + ob..][..d]);
            E::silu_mul_row(a, b, o, e)
        },
    )
}

#[inline(always)]
fn silu_mul_row_generic<E: Lane>(a: &[E], b: &[E], o: &mut [E], e: &mut [f32]) {
    for (e, v) in e.iter_mut().zip(a) {
        *e = -v.widen();
    }
    super::attention::exp_generic(e);
    for (((o, v), w), &e) in o.iter_mut().zip(a).zip(b).zip(e.iter()) {
        let silu = E::round(v.widen() / (1.0 + e));
        *o = E::narrow(silu * w.widen());
    }
}

/// CLIP's `quick_gelu`, `x sigmoid(1.702 x)`, for an f32 or bf16 CPU tensor, in one parallel pass
/// with the roundings of transformers' composed ops in the tensor's dtype: `1.702 x` rounded, its
/// sigmoid (`1 / (1 + e^-t)` in f32) rounded, the product rounded.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    unary(
        x,
        "quick_gelu",
        <f32 as RowPasses>::quick_gelu_row,
        <bf16 as RowPasses>::quick_gelu_row,
    )
}

/// The exact (erf) GELU, `x/2 (1 + erf(x / sqrt 2))`, for an f32 or bf16 CPU tensor, in f32 and
/// rounded once (PyTorch's `gelu`, in its order: `1 + erf` in f32, which cancels in the negative
/// tail as PyTorch's does): erf as 1 - erfc (Numerical Recipes' Chebyshev fit, fractional error
/// below 1.2e-7), vectorised. candle's op runs erf one element at a time.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    unary(
        x,
        "gelu_erf",
        <f32 as RowPasses>::gelu_erf_row,
        <bf16 as RowPasses>::gelu_erf_row,
    )
}

/// An element-wise pass over an f32 or bf16 CPU tensor, in [`passes_with`]'s parallel pieces.
fn unary(
    x: &Tensor,
    name: &str,
    f32_pass: fn(&[f32], &mut [f32], &mut [f32]),
    bf16_pass: fn(&[bf16], &mut [bf16], &mut [f32]),
) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => passes_with(x, |x, o, buf| f32_pass(x, o, &mut buf[..x.len()])),
        DType::BF16 => passes_with(x, |x, o, buf| bf16_pass(x, o, &mut buf[..x.len()])),
        dtype => candle_core::bail!("{name} on the CPU: {dtype:?} (f32 or bf16 expected)"),
    }
}

#[inline(always)]
fn quick_gelu_row_generic<E: Lane>(x: &[E], o: &mut [E], e: &mut [f32]) {
    for (e, v) in e.iter_mut().zip(x) {
        *e = -E::round(1.702 * v.widen());
    }
    super::attention::exp_generic(e);
    for ((o, v), &e) in o.iter_mut().zip(x).zip(e.iter()) {
        let sigmoid = E::round(1.0 / (1.0 + e));
        *o = E::narrow(v.widen() * sigmoid);
    }
}

#[inline(always)]
fn gelu_erf_row_generic<E: Lane>(x: &[E], o: &mut [E], e: &mut [f32]) {
    // erfc(z) = t exp(-z² + p(t)), t = 1 / (1 + z/2), z = |x| / sqrt 2 >= 0.
    const P: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_204,
        1.488_515_9,
        -0.822_152_23,
        0.170_872_77,
    ];
    let t = |v: f32| 1.0 / (1.0 + 0.5 * (v.abs() * std::f32::consts::FRAC_1_SQRT_2));
    for (e, v) in e.iter_mut().zip(x) {
        let v = v.widen();
        let z = v.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let t = t(v);
        let mut p = P[9];
        for &c in P[..9].iter().rev() {
            p = p * t + c;
        }
        *e = p - z * z;
    }
    super::attention::exp_generic(e);
    for ((o, v), &e) in o.iter_mut().zip(x).zip(e.iter()) {
        let v = v.widen();
        let erf = (1.0 - t(v) * e).copysign(v);
        *o = E::narrow(v * 0.5 * (1.0 + erf));
    }
}

/// A bf16 CPU tensor widened to f32 (exactly), in parallel vectorised pieces (candle's conversion
/// runs on one thread: 35 ms for a 1536 x 6144 weight on a Zen 3 core).
pub fn widen(x: &Tensor) -> Result<Tensor> {
    const CHUNK: usize = 1 << 14;
    let out = with_slice::<bf16, _>(x, |xs| {
        par_new(
            xs.len(),
            CHUNK,
            0f32,
            || (),
            |_, i, o| widen_bf16(&xs[i * CHUNK..][..o.len()], o),
        )
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// An f32 CPU tensor rounded to bf16 (nearest even, as candle's conversion), in parallel pieces
/// ([`round_to_bf16`]).
pub fn round(x: &Tensor) -> Result<Tensor> {
    const CHUNK: usize = 1 << 14;
    let out = with_slice::<f32, _>(x, |xs| {
        par_new(
            xs.len(),
            CHUNK,
            bf16::ZERO,
            || (),
            |_, i, o| round_chunk(&xs[i * CHUNK..][..o.len()], o),
        )
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// `o = x` rounded to bf16 (nearest even), in parallel pieces: the one rounding of a bf16 product
/// summed in f32.
pub fn round_to_bf16(x: &[f32], o: &mut [bf16]) {
    assert_eq!(x.len(), o.len(), "round_to_bf16: lengths differ");
    const CHUNK: usize = 1 << 14;
    o.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| round_chunk(x, o));
}

super::vector_dispatch!(round_chunk, round_chunk_generic, (x: &[f32], o: &mut [bf16]));

super::vector_dispatch!(widen_bf16, widen_bf16_generic, (x: &[bf16], o: &mut [f32]));

super::vector_dispatch!(through_bf16, through_bf16_generic, (x: &mut [f32]));

/// `x` rounded to bf16 (nearest even, as [`round_to_bf16`]) and widened back, in place, on the
/// calling thread: the values a bf16 copy of `x` holds, as the f32 kernel multiplies them.
#[inline(always)]
fn through_bf16_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = f32::from_bits((round_bf16(*v).to_bits() as u32) << 16);
    }
}

/// `o = x` widened to f32 (exactly: a bf16 is the high half of an f32), on the calling thread.
#[inline(always)]
fn widen_bf16_generic(x: &[bf16], o: &mut [f32]) {
    assert_eq!(x.len(), o.len(), "widen_bf16: lengths differ");
    for (o, v) in o.iter_mut().zip(x) {
        *o = f32::from_bits((v.to_bits() as u32) << 16);
    }
}

#[inline(always)]
fn round_chunk_generic(x: &[f32], o: &mut [bf16]) {
    for (o, &v) in o.iter_mut().zip(x) {
        *o = round_bf16(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Normal(0, 3) inputs, reproducible.
    fn normal(shape: (usize, usize), seed: u64) -> Tensor {
        crate::cpu::normal_tensor(shape, 3.0, seed)
    }

    /// max over elements of |got - want| - (rel |want| + abs): at most 0 when within tolerance.
    fn excess(got: &Tensor, want: &Tensor, rel: f64, abs: f64) -> f32 {
        let tol = ((want.abs().unwrap() * rel).unwrap() + abs).unwrap();
        ((got - want).unwrap().abs().unwrap() - tol)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// got equals want but for at most one element in `per`, each within `rel` of want.
    fn rarely_one_rounding_apart(got: &[f32], want: &[f32], rel: f32, per: usize) {
        let mut differ = 0;
        for (w, g) in want.iter().zip(got) {
            if w != g {
                differ += 1;
                assert!((w - g).abs() <= w.abs() * rel, "{g} against {w}");
            }
        }
        assert!(
            differ * per <= want.len(),
            "{differ} of {} differ",
            want.len()
        );
    }

    /// `gelu_new(gate) * up` against candle's bf16 ops (what T5 ran on before): equal but for
    /// tanh's last f32 bits, which may move a bf16 rounding by one ulp, rarely. Inputs over the
    /// whole range of T5's gate values, and tanh itself against libm's.
    #[test]
    fn gelu_new_mul_equals_candles_bf16_ops() {
        let g = normal((7, 5003), 13).to_dtype(DType::BF16).unwrap();
        let u = normal((7, 5003), 14).to_dtype(DType::BF16).unwrap();
        let want = (g.gelu().unwrap() * &u)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = gelu_new_mul_bf16(&g, &u)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let (want, got) = (
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        rarely_one_rounding_apart(&got, &want, 2f32.powi(-7), 2000);
        let mut xs: Vec<f32> = (0..20000).map(|i| -10.0 + i as f32 * 1e-3).collect();
        let libm: Vec<f32> = xs.iter().map(|x| x.tanh()).collect();
        tanh_in(&mut xs);
        for (x, t) in xs.iter().zip(&libm) {
            assert!(
                (x - t).abs() <= 2.0 * f32::EPSILON * t.abs().max(1e-30) + 1e-38,
                "{x} vs {t}"
            );
        }
    }

    /// Against candle's broadcasting add, bit for bit, in f32 and bf16 (one rounding of the sum).
    #[test]
    fn add_over_batch_equals_candles_broadcast_add() {
        for dtype in [DType::F32, DType::BF16] {
            let x = normal((2 * 37, 200), 21).reshape((2, 37, 200)).unwrap();
            let y = normal((37, 200), 22).unsqueeze(0).unwrap();
            let (x, y) = (x.to_dtype(dtype).unwrap(), y.to_dtype(dtype).unwrap());
            let want = x.broadcast_add(&y).unwrap();
            let got = add_over_batch(&x, &y).unwrap();
            let v = |t: &Tensor| {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(v(&got), v(&want), "{dtype:?}");
        }
        let x = normal((2 * 3, 4), 1).reshape((2, 3, 4)).unwrap();
        assert!(add_over_batch(&x, &normal((4, 4), 2)).is_err());
    }

    /// `silu(a) * b` in f32 against candle's ops (libm's exp): within f32 rounding of the
    /// vectorised exp. In bf16 against the SiLU taken in f32 of the same inputs and rounded, then
    /// the product rounded (PyTorch's two ops): equal but for the exp's last f32 bits, which may
    /// move a rounding by one bf16 ulp, rarely. swiglu equals silu_mul of the halves, bit for bit.
    #[test]
    fn silu_mul_equals_the_composed_ops() {
        let (a, b) = (normal((5, 3001), 31), normal((5, 3001), 32));
        let want = (a.silu().unwrap() * &b).unwrap();
        let e = excess(&silu_mul(&a, &b).unwrap(), &want, 2e-6, 1e-30);
        assert!(e <= 0.0, "beyond f32 rounding by {e}");
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (a, b) = (bf(&a), bf(&b));
        let f = |t: &Tensor| -> Vec<f32> {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let silu = bf(&a.to_dtype(DType::F32).unwrap().silu().unwrap());
        let want = f(&(silu * &b).unwrap());
        let got = f(&silu_mul(&a, &b).unwrap());
        rarely_one_rounding_apart(&got, &want, 2f32.powi(-6), 1000);
        for dtype in [DType::F32, DType::BF16] {
            let x = normal((6, 2 * 1001), 33).to_dtype(dtype).unwrap();
            let (lo, hi) = (
                x.narrow(1, 0, 1001).unwrap(),
                x.narrow(1, 1001, 1001).unwrap(),
            );
            let want = f(&silu_mul(&lo.contiguous().unwrap(), &hi.contiguous().unwrap()).unwrap());
            assert_eq!(f(&swiglu(&x).unwrap()), want, "{dtype:?}");
        }
        assert!(silu_mul(&normal((2, 4), 1), &normal((4, 2), 2)).is_err());
        assert!(swiglu(&normal((2, 5), 1)).is_err());
    }

    /// The AVX-512 GELU (base-2 exponential, reciprocal with a Newton step) against the generic
    /// formula (natural exponential, division) from -20 to 20: within 3 ulp of the value plus 2e-7
    /// |v| (the cancellation in 1 + tanh(u) for negative v, the same in both); infinities and NaN
    /// as the generic formula gives them.
    #[test]
    fn gelu_avx512_equals_the_generic_formula() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let x: Vec<f32> = (0..400_001)
            .map(|i| -20.0 + i as f32 * 1e-4)
            .chain([0.0, -0.0, f32::MIN_POSITIVE, 1e30, -1e30, f32::INFINITY])
            .chain([f32::NEG_INFINITY, f32::NAN])
            .collect();
        let (mut want, mut got) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_tanh_in(&x, &mut want);
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { gelu_tanh_avx512(&x, &mut got) };
        for ((&v, &w), &g) in x.iter().zip(&want).zip(&got) {
            if !w.is_finite() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{v}: {g} vs {w}"
                );
                continue;
            }
            let tol = 3.0 * f32::EPSILON * w.abs() + 2e-7 * v.abs();
            assert!((g - w).abs() <= tol, "gelu({v}): {g} vs {w}");
        }
    }

    /// Against candle's f32 GELU (tanh per element): within f32 rounding of the exp-based tanh.
    #[test]
    fn gelu_f32_equals_candles() {
        let x = normal((3, 5001), 11);
        let e = excess(&gelu_tanh_f32(&x).unwrap(), &x.gelu().unwrap(), 1e-6, 5e-7);
        assert!(e <= 0.0, "beyond f32 rounding by {e}");
    }

    /// Against candle's f32 GELU of the same bf16 inputs, rounded: within one bf16 rounding.
    #[test]
    fn gelu_bf16_equals_f32_gelu_rounded() {
        let x = normal((3, 5000), 12).to_dtype(DType::BF16).unwrap();
        let want = x.to_dtype(DType::F32).unwrap().gelu().unwrap();
        let got = gelu_tanh_bf16(&x).unwrap().to_dtype(DType::F32).unwrap();
        let e = excess(&got, &want, 2f64.powi(-8), 1e-6);
        assert!(e <= 0.0, "beyond one rounding by {e}");
    }
    /// quick_gelu against the composed ops (candle's f32 sigmoid, libm's exp): in f32 within f32
    /// rounding of the vectorised exp; in bf16 against the ops in bf16 as transformers composes
    /// them (`1.702 x` rounded, the sigmoid taken in f32 and rounded, the product rounded): equal
    /// but for the exp's last f32 bits moving a rounding by one bf16 ulp, rarely.
    #[test]
    fn quick_gelu_equals_the_composed_ops() {
        let x = normal((5, 3001), 41);
        let sig = |t: &Tensor| candle_nn::ops::sigmoid(t).unwrap();
        let want = (&x * sig(&(&x * 1.702).unwrap())).unwrap();
        let e = excess(&quick_gelu(&x).unwrap(), &want, 2e-6, 1e-30);
        assert!(e <= 0.0, "beyond f32 rounding by {e}");
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| -> Vec<f32> {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let x = bf(&x);
        let scaled = bf(&(x.to_dtype(DType::F32).unwrap() * 1.702).unwrap());
        let s = bf(&sig(&scaled.to_dtype(DType::F32).unwrap()));
        let want = f(&(&x * s).unwrap());
        rarely_one_rounding_apart(&f(&quick_gelu(&x).unwrap()), &want, 2f32.powi(-6), 1000);
        assert!(quick_gelu(&x.to_dtype(DType::F16).unwrap()).is_err());
    }

    /// The erf GELU against candle's f32 op (libm's erf, `x/2 (1 + erf)` in f32 as PyTorch's):
    /// within 1e-6 relative, plus where `1 + erf` cancels in the negative tail an f32 ulp of 1
    /// times |x|/2 (both compute the same sum); in bf16 within one rounding of the f32 value.
    #[test]
    fn gelu_erf_equals_candles() {
        let mut xs = normal((3, 5001), 42)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        xs.extend((0..4000).map(|i| -12.0 + i as f32 * 6e-3));
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 12.0, 30.0, -30.0]);
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let want = x.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let got = gelu_erf(&x).unwrap().to_vec1::<f32>().unwrap();
        for ((x, w), g) in xs.iter().zip(&want).zip(&got) {
            let tol = 1e-6 * w.abs() + f32::EPSILON * x.abs() / 2.0;
            assert!((g - w).abs() <= tol, "gelu_erf({x}): {g} against {w}");
        }
        let xb = x.to_dtype(DType::BF16).unwrap();
        let want = xb.to_dtype(DType::F32).unwrap().gelu_erf().unwrap();
        let got = gelu_erf(&xb).unwrap().to_dtype(DType::F32).unwrap();
        let e = excess(&got, &want, 2f64.powi(-8), 1e-37);
        assert!(e <= 0.0, "beyond one rounding by {e}");
    }
}
