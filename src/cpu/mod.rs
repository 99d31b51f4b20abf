//! CPU kernels that candle lacks: AMX bf16 matrix products and attention, a vectorised bf16 GELU.

/// Defines `$name(args)` that runs `$generic(args)` compiled for AVX-512 when the CPU has it (the
/// build targets baseline x86_64), else as built.
macro_rules! avx512_dispatch {
    ($name:ident, $generic:ident, ($($arg:ident : $ty:ty),*)) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use avx512_dispatch;

pub mod aligned;
pub mod amx;
pub mod attention;
pub mod conv;
pub mod group_norm;
pub mod sgemm;

use candle_core::{Device, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// A raw output pointer shared by parallel tasks that write disjoint parts of one output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: users write disjoint elements from each task.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// (A method, so that closures capture the wrapper rather than the bare pointer.)
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// Splits a product's m rows and `panels` column panels into tasks `(first row, rows, first panel,
/// end panel)` for the rayon pool: row chunks of at most `max_rows` (a multiple of `granule` but
/// the last), as even as the granule allows and a multiple of the thread count when there are
/// enough rows; column ranges split further when there are fewer chunks than twice the threads.
pub(crate) fn split_tasks(
    m: usize,
    max_rows: usize,
    granule: usize,
    panels: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let threads = rayon::current_num_threads().max(1);
    let mut chunks = m.div_ceil(max_rows);
    if m >= threads * max_rows / 2 {
        chunks = chunks.next_multiple_of(threads);
    }
    let per_chunk = m.div_ceil(chunks.max(1)).next_multiple_of(granule);
    let chunks = m.div_ceil(per_chunk.max(1));
    let split = (2 * threads)
        .div_ceil(chunks.max(1))
        .clamp(1, panels.max(1));
    let per = panels.div_ceil(split);
    (0..chunks)
        .flat_map(|c| {
            let (r0, rows) = (c * per_chunk, per_chunk.min(m - c * per_chunk));
            (0..split)
                .map(move |s| (r0, rows, s * per, ((s + 1) * per).min(panels)))
                .filter(|&(_, _, lo, hi)| lo < hi)
        })
        .collect()
}

/// Calls `f` with the elements of a CPU tensor of element type `T` in row-major order (copying only
/// if the tensor is not contiguous).
pub fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Ok(f(&cpu.as_slice::<T>()?[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("expected a CPU tensor, got one on {:?}", t.device()),
    }
}

/// f32 -> bf16, round to nearest even (as `half`'s conversion), written so that loops vectorise.
#[inline(always)]
pub fn round_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    let r = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    bf16::from_bits(if v.is_nan() { 0x7fc0 } else { r })
}

/// tanh-approximated GELU of a bf16 CPU tensor, computed in f32 and rounded once (as PyTorch does
/// for bf16): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_bf16(x: &Tensor) -> Result<Tensor> {
    gelu_tanh_with(x, |x: &[bf16], o: &mut [bf16], buf: &mut [f32]| {
        let (xf, e) = buf.split_at_mut(x.len());
        for (f, v) in xf.iter_mut().zip(x) {
            *f = v.to_f32();
        }
        gelu_bf16_chunk(xf, e, o)
    })
}

/// tanh-approximated GELU of an f32 CPU tensor, vectorised (candle's is a scalar `tanh` per element).
pub fn gelu_tanh_f32(x: &Tensor) -> Result<Tensor> {
    gelu_tanh_with(x, |x: &[f32], o: &mut [f32], buf: &mut [f32]| {
        gelu_f32_chunk(x, &mut buf[..x.len()], o)
    })
}

/// Runs `chunk(x, out, scratch of 2 x len f32)` over a CPU tensor in parallel pieces.
fn gelu_tanh_with<T: candle_core::WithDType>(
    x: &Tensor,
    chunk: impl Fn(&[T], &mut [T], &mut [f32]) + Sync,
) -> Result<Tensor> {
    const CHUNK: usize = 4096;
    let out = with_slice::<T, _>(x, |xs| {
        let mut out = vec![T::zero(); xs.len()];
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                let mut buf = vec![0f32; 2 * x.len()];
                chunk(x, o, &mut buf);
            });
        out
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

avx512_dispatch!(gelu_bf16_chunk, gelu_bf16_chunk_generic, (x: &[f32], e: &mut [f32], o: &mut [bf16]));
avx512_dispatch!(gelu_f32_chunk, gelu_f32_chunk_generic, (x: &[f32], e: &mut [f32], o: &mut [f32]));

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
    attention::exp_generic(e);
    for (e, &v) in e.iter_mut().zip(x) {
        let t = 1.0 - 2.0 / (*e + 1.0);
        *e = 0.5 * v * (1.0 + t);
    }
}

/// Per-sample vectors (b, d) of a bf16 or f32 tensor as f32 rows.
fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_dtype(candle_core::DType::F32)?.to_vec2()
}

/// `modulate(layer_norm(x), shift, scale)` for bf16 CPU tensors, with the roundings of the composed
/// bf16 path (and of PyTorch in bf16): the norm (f32 statistics) rounded, `1 + scale` rounded, the
/// product rounded, the sum rounded. x: (b, n, d); shift, scale: (b, d).
pub fn norm_modulate_bf16(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let beta = rows_f32(shift)?;
    let alpha: Vec<Vec<f32>> = rows_f32(scale)?
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|s| round_bf16(s + 1.0).to_f32())
                .collect()
        })
        .collect();
    if beta.len() != b || alpha.len() != b || beta.iter().chain(&alpha).any(|r| r.len() != d) {
        candle_core::bail!(
            "norm_modulate: x {:?}, shift {:?}, scale {:?}",
            x.shape(),
            shift.shape(),
            scale.shape()
        );
    }
    let out = with_slice::<bf16, _>(x, |xs| {
        let mut out = vec![bf16::ZERO; xs.len()];
        out.par_chunks_mut(d)
            .zip(xs.par_chunks(d))
            .enumerate()
            .for_each_init(
                || vec![0f32; d],
                |buf, (row, (o, x))| {
                    let i = row / n.max(1);
                    ln_mod_row(x, o, &alpha[i], &beta[i], eps as f32, buf)
                },
            );
        out
    })?;
    Tensor::from_vec(out, (b, n, d), &Device::Cpu)
}

avx512_dispatch!(ln_mod_row, ln_mod_row_generic, (x: &[bf16], o: &mut [bf16], alpha: &[f32], beta: &[f32], eps: f32, buf: &mut [f32]));

#[inline(always)]
fn ln_mod_row_generic(
    x: &[bf16],
    o: &mut [bf16],
    alpha: &[f32],
    beta: &[f32],
    eps: f32,
    buf: &mut [f32],
) {
    let d = x.len() as f32;
    for (f, v) in buf.iter_mut().zip(x) {
        *f = v.to_f32();
    }
    let mean = lane_sum(buf) / d;
    for f in buf.iter_mut() {
        *f -= mean;
    }
    let mut sq = [0f32; 16];
    let chunks = buf.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, &v) in sq.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let var = (sq.iter().sum::<f32>() + tail) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &a), &b) in o.iter_mut().zip(buf.iter()).zip(alpha).zip(beta) {
        let normed = round_bf16(v * inv).to_f32();
        let scaled = round_bf16(normed * a).to_f32();
        *o = round_bf16(scaled + b);
    }
}

#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// diffusers' `RMSNorm` for bf16 CPU tensors over the last dim, with its roundings: `x / rms(x)`
/// in f32 rounded to bf16, then times the weight, rounded.
pub fn rms_norm_bf16(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let w: Vec<f32> = weight.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    if w.len() != d {
        candle_core::bail!("rms_norm: x {:?}, weight {:?}", x.shape(), weight.shape());
    }
    let out = with_slice::<bf16, _>(x, |xs| {
        let mut out = vec![bf16::ZERO; xs.len()];
        out.par_chunks_mut(d * 64)
            .zip(xs.par_chunks(d * 64))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    rms_row(x, o, &w, eps as f32)
                }
            });
        out
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

avx512_dispatch!(rms_row, rms_row_generic, (x: &[bf16], o: &mut [bf16], w: &[f32], eps: f32));

#[inline(always)]
fn rms_row_generic(x: &[bf16], o: &mut [bf16], w: &[f32], eps: f32) {
    let mut sq = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| v.to_f32() * v.to_f32())
        .sum();
    for c in chunks {
        for (l, v) in sq.iter_mut().zip(c) {
            *l += v.to_f32() * v.to_f32();
        }
    }
    let inv = 1.0 / ((sq.iter().sum::<f32>() + tail) / x.len() as f32 + eps).sqrt();
    for ((o, v), &w) in o.iter_mut().zip(x).zip(w) {
        *o = round_bf16(round_bf16(v.to_f32() * inv).to_f32() * w);
    }
}

/// `x + gate * y` for bf16 CPU tensors with a per-sample gate, each operation rounded as in bf16.
/// x, y: (b, n, d); gate: (b, d).
pub fn add_gated_bf16(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
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
    let out = with_slice::<bf16, _>(x, |xs| {
        with_slice::<bf16, _>(y, |ys| {
            let mut out = vec![bf16::ZERO; xs.len()];
            out.par_chunks_mut(d)
                .zip(xs.par_chunks(d).zip(ys.par_chunks(d)))
                .enumerate()
                .for_each(|(row, (o, (x, y)))| add_gated_row(x, y, &g[row / n.max(1)], o));
            out
        })
    })??;
    Tensor::from_vec(out, (b, n, d), &Device::Cpu)
}

avx512_dispatch!(add_gated_row, add_gated_row_generic, (x: &[bf16], y: &[bf16], g: &[f32], o: &mut [bf16]));

#[inline(always)]
fn add_gated_row_generic(x: &[bf16], y: &[bf16], g: &[f32], o: &mut [bf16]) {
    for (((o, x), y), &g) in o.iter_mut().zip(x).zip(y).zip(g) {
        let t = round_bf16(y.to_f32() * g).to_f32();
        *o = round_bf16(x.to_f32() + t);
    }
}

/// `len` values uniform in [lo, hi) from a 64-bit LCG, for the kernels' tests.
#[cfg(test)]
pub(crate) fn lcg_uniform(len: usize, seed: &mut u64, lo: f32, hi: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * (hi - lo) + lo
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn round_bf16_equals_half() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0, // a tie: rounds to even (down)
            1.0 + 3.0 / 256.0, // a tie: rounds to even (up)
            -3.3e-5,
            6.5e4,
            3.0e38,
            f32::INFINITY,
            1e-40,
        ] {
            assert_eq!(round_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let v = f32::from_bits(s & 0x7f7f_ffff) * if s & 1 == 0 { 1.0 } else { -1.0 };
            assert_eq!(round_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{v}");
        }
    }

    /// Normal(0, std) values (Box-Muller over the LCG, so that a run is reproducible) as bf16.
    fn bf16_rand(shape: (usize, usize, usize), std: f64, mut seed: u64) -> Tensor {
        let len = shape.0 * shape.1 * shape.2;
        let u = lcg_uniform(2 * len, &mut seed, 0.0, 1.0);
        let v: Vec<f32> = u
            .chunks_exact(2)
            .map(|p| {
                let r = (-2.0 * (1.0 - p[0]).ln()).sqrt();
                std as f32 * r * (std::f32::consts::TAU * p[1]).cos()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// (max |a - b| / (|b| + 1), share of elements that differ)
    fn compare(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let (a, b) = (
            a.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        let rel = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (y.abs() + 1.0))
            .fold(0f32, f32::max);
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f32 / a.len() as f32;
        (rel, differ)
    }

    /// The fused bf16 kernels against candle's composed bf16 ops: the residual update is bit for
    /// bit equal; the norm differs only where f32 statistics summed in another order tip a rounding
    /// (one bf16 step of the scaled norm, which the shift may then cancel: so measured against
    /// |b| + 1; on under 1% of elements).
    #[test]
    fn fused_bf16_norms_and_gates_equal_the_composed_ops() {
        let (b, n, d) = (2, 37, 200);
        let x = (bf16_rand((b, n, d), 2.0, 1) + 0.5).unwrap();
        let y = bf16_rand((b, n, d), 1.0, 2);
        let shift = bf16_rand((1, b, d), 1.0, 3).squeeze(0).unwrap();
        let scale = bf16_rand((1, b, d), 1.0, 4).squeeze(0).unwrap();
        let want = crate::mmdit::modulation::modulate(
            &crate::mmdit::modulation::layer_norm(&x, 1e-6).unwrap(),
            &shift,
            &scale,
        )
        .unwrap();
        let got = norm_modulate_bf16(&x, 1e-6, &shift, &scale).unwrap();
        let (rel, differ) = compare(&got, &want);
        assert!(
            rel <= 2f32.powi(-7) * 1.01 && differ < 0.01,
            "norm: rel {rel}, differ {differ}"
        );
        let rms = crate::mmdit::attention::RmsNorm::from_weight(shift.get(0).unwrap(), 1e-6);
        let (rel, differ) = compare(
            &rms_norm_bf16(&x, &shift.get(0).unwrap(), 1e-6).unwrap(),
            &rms.forward(&x).unwrap(),
        );
        assert!(
            rel <= 2f32.powi(-7) * 1.01 && differ < 0.01,
            "rms: rel {rel}, differ {differ}"
        );
        let want = (&x + y.broadcast_mul(&scale.unsqueeze(1).unwrap()).unwrap()).unwrap();
        let got = add_gated_bf16(&x, &y, &scale).unwrap();
        assert_eq!(compare(&got, &want), (0.0, 0.0));
    }

    /// Against candle's f32 GELU (tanh per element): within f32 rounding of the exp-based tanh.
    #[test]
    fn gelu_f32_equals_candles() {
        let x = Tensor::randn(0f32, 3.0, (3, 5001), &Device::Cpu).unwrap();
        let want = x.gelu().unwrap();
        let got = gelu_tanh_f32(&x).unwrap();
        let tol = ((want.abs().unwrap() * 1e-6).unwrap() + 5e-7).unwrap();
        let excess = ((got - want).unwrap().abs().unwrap() - tol)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(excess <= 0.0, "beyond f32 rounding by {excess}");
    }

    /// Against candle's f32 GELU of the same bf16 inputs, rounded: within one bf16 rounding.
    #[test]
    fn gelu_bf16_equals_f32_gelu_rounded() {
        let x = (Tensor::randn(0f32, 3.0, (3, 5000), &Device::Cpu).unwrap())
            .to_dtype(DType::BF16)
            .unwrap();
        let want = x.to_dtype(DType::F32).unwrap().gelu().unwrap();
        let got = gelu_tanh_bf16(&x).unwrap().to_dtype(DType::F32).unwrap();
        let tol = ((want.abs().unwrap() * 2f64.powi(-8)).unwrap() + 1e-6).unwrap();
        let excess = ((got - want).unwrap().abs().unwrap() - tol)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(excess <= 0.0, "beyond one rounding by {excess}");
    }
}
