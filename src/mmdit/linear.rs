//! The transformer's linear layers: candle's `Linear`, except on the CPU where a faster kernel
//! exists: in bf16 with AMX, the weight is packed once at load into AMX tiles and products run on
//! [`crate::cpu::amx`]; in f32 with AVX-512, it is packed into 32-column panels for
//! [`crate::cpu::sgemm`]. Either way candle's copy of the weight is dropped.

use crate::cpu::amx::{self, PackedB};
use crate::cpu::sgemm::{self, PackedF32};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear(Inner);

#[derive(Debug, Clone)]
enum Inner {
    Plain(candle_nn::Linear),
    Amx(Arc<AmxWeight>),
    Avx512(Arc<F32Weight>),
}

#[derive(Debug)]
struct F32Weight {
    packed: PackedF32,
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
struct AmxWeight {
    packed: PackedB,
    bias: Option<Vec<f32>>,
}

/// diffusers' `nn.Linear(in_dim, out_dim)` with bias, from `vb` (`weight`, `bias`).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear(in_dim, out_dim, vb)?)
}

impl Linear {
    /// Wraps candle's layer, packing it for AMX when it is a bf16 CPU layer and AMX is available,
    /// or for the AVX-512 kernel when it is an f32 CPU layer and the CPU has AVX-512.
    pub fn new(l: candle_nn::Linear) -> Result<Self> {
        let w = l.weight();
        // (A non-contiguous weight is a view, such as the zero-stride stand-ins of the weight
        // audit: packing it would materialise it. Loaded weights are contiguous.)
        if !(w.device().is_cpu() && w.rank() == 2 && w.is_contiguous()) {
            return Ok(Self(Inner::Plain(l)));
        }
        let (n, k) = w.dims2()?;
        if w.dtype() == DType::F32 && sgemm::available() {
            let packed = crate::cpu::with_slice::<f32, _>(w, |w| PackedF32::from_nk(w, n, k))?;
            let bias = match l.bias() {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
                None => None,
            };
            return Ok(Self(Inner::Avx512(Arc::new(F32Weight { packed, bias }))));
        }
        if !(w.dtype() == DType::BF16 && amx::available()) {
            return Ok(Self(Inner::Plain(l)));
        }
        let packed = crate::cpu::with_slice::<half::bf16, _>(w, |w| PackedB::from_nk(w, n, k))?;
        let bias = match l.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        Ok(Self(Inner::Amx(Arc::new(AmxWeight { packed, bias }))))
    }

    /// Whether products run on AMX tiles.
    pub fn is_amx(&self) -> bool {
        matches!(self.0, Inner::Amx(_))
    }

    /// Whether products run on the AVX-512 f32 kernel.
    pub fn is_avx512(&self) -> bool {
        matches!(self.0, Inner::Avx512(_))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.0 {
            Inner::Plain(l) => l.forward(x),
            Inner::Amx(w) => packed_forward(x, w.packed.k(), w.packed.n(), "AMX", |a, m, out| {
                amx::matmul(
                    a,
                    m,
                    w.packed.k(),
                    &w.packed,
                    w.bias.as_deref(),
                    out,
                    w.packed.n(),
                )
            }),
            Inner::Avx512(w) => {
                packed_forward(x, w.packed.k(), w.packed.n(), "AVX-512", |a, m, out| {
                    sgemm::matmul(
                        a,
                        m,
                        w.packed.k(),
                        &w.packed,
                        w.bias.as_deref(),
                        out,
                        w.packed.n(),
                    )
                })
            }
        }
    }
}

/// `x (.., k) -> (.., n)` by `product(x rows, m, out)` for a packed layer whose kernel takes element
/// type T: checks the input (its type, the CPU, k), then runs over its m rows.
fn packed_forward<T: candle_core::WithDType>(
    x: &Tensor,
    k: usize,
    n: usize,
    kernel: &str,
    product: impl FnOnce(&[T], usize, &mut [T]),
) -> Result<Tensor> {
    if x.dtype() != T::DTYPE || !x.device().is_cpu() || x.dim(candle_core::D::Minus1)? != k {
        candle_core::bail!(
            "{kernel} linear ({k} -> {n}, {} CPU) given {:?} {:?} on {:?}",
            T::DTYPE.as_str(),
            x.shape(),
            x.dtype(),
            x.device()
        );
    }
    let m = x.elem_count() / k;
    let mut out = vec![T::zero(); m * n];
    crate::cpu::with_slice::<T, _>(x, |a| product(a, m, &mut out))?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AMX layer against the f32 product of the same bf16 values: one bf16 rounding of the result
    /// (half an ulp), and no further from it than candle's bf16 layer (which rounds the product,
    /// then adds the bias in bf16).
    #[test]
    fn amx_linear_rounds_once_and_beats_candles() {
        if !amx::available() {
            eprintln!("AMX not available here: test skipped");
            return;
        }
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let max = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        for &(m, k, n) in &[(3, 40, 24), (2 * 77, 256, 384)] {
            let w = bf(Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap());
            let b = bf(Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            let x = bf(Tensor::randn(0f32, 1.0, (2, m / 2 + 1, k), &dev).unwrap());
            let exact = candle_nn::Linear::new(f(&w), Some(f(&b)))
                .forward(&f(&x))
                .unwrap();
            let plain = candle_nn::Linear::new(w, Some(b));
            let fast = Linear::new(plain.clone()).unwrap();
            assert!(fast.is_amx());
            let got = f(&fast.forward(&x).unwrap());
            let err = (got - &exact).unwrap().abs().unwrap();
            let half_ulp = ((exact.abs().unwrap() * 2f64.powi(-8)).unwrap() + 1e-5).unwrap();
            let excess = max((&err - half_ulp).unwrap());
            assert!(excess <= 0.0, "{m}x{k}x{n}: beyond half an ulp by {excess}");
            let candle_err = (f(&plain.forward(&x).unwrap()) - &exact)
                .unwrap()
                .abs()
                .unwrap();
            assert!(
                max(err) <= max(candle_err),
                "{m}x{k}x{n}: AMX further off than candle"
            );
        }
    }

    /// The AVX-512 f32 layer against candle's f32 layer: the same sums in another order.
    #[test]
    fn avx512_linear_equals_candles() {
        if !sgemm::available() {
            eprintln!("AVX-512 not available here: test skipped");
            return;
        }
        let dev = Device::Cpu;
        for &(m, k, n, bias) in &[(3, 40, 24, true), (2 * 77, 300, 70, false)] {
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            let x = Tensor::randn(0f32, 1.0, (2, m / 2 + 1, k), &dev).unwrap();
            let plain = candle_nn::Linear::new(w, b);
            let fast = Linear::new(plain.clone()).unwrap();
            assert!(fast.is_avx512());
            let diff = (fast.forward(&x).unwrap() - plain.forward(&x).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 2e-6, "{m}x{k}x{n}: {diff}");
            // Narrowed (non-contiguous) input.
            let xs = x.narrow(2, 0, k).unwrap();
            assert_eq!(
                fast.forward(&xs).unwrap().dims3().unwrap(),
                (2, m / 2 + 1, n)
            );
        }
    }
}
