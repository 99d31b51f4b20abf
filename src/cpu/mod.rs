//! CPU kernels that candle lacks: AMX bf16 matrix products and attention, a vectorised bf16 GELU.

pub mod amx;
pub mod attention;

use candle_core::{CpuStorage, Device, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Calls `f` with the elements of a bf16 CPU tensor in row-major order (copying only if the tensor
/// is not contiguous).
pub fn with_bf16_slice<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::BF16(data)) => {
            let start = layout.start_offset();
            Ok(f(&data[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!(
            "expected a bf16 CPU tensor, got {:?} on {:?}",
            t.dtype(),
            t.device()
        ),
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
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    const CHUNK: usize = 4096;
    let out = with_bf16_slice(x, |xs| {
        let mut out = vec![bf16::ZERO; xs.len()];
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                // tanh(u) = 1 - 2 / (e^(2u) + 1)
                let mut e: Vec<f32> = xf
                    .iter()
                    .map(|&v| 2.0 * C * (v + 0.044715 * v * v * v))
                    .collect();
                attention::exp_in_place(&mut e);
                for ((o, &v), &e) in o.iter_mut().zip(&xf).zip(&e) {
                    let t = 1.0 - 2.0 / (e + 1.0);
                    *o = round_bf16(0.5 * v * (1.0 + t));
                }
            });
        out
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
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
