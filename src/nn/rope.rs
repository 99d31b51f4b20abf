//! Rotary position embedding of adjacent channel pairs (diffusers' `apply_rotary_emb` with
//! `use_real_unbind_dim=-1`, BFL's `apply_rope`): the rotation, given per-token tables. The tables
//! themselves (which positions, which frequencies) are the model's (`mmdit::rope`).

use candle_core::{DType, Result, Tensor};

/// `x` with each adjacent channel pair (x0, x1) of token t rotated to (x0 c - x1 s, x0 s + x1 c),
/// c and s the tables' entry (t, pair), computed in f32 and rounded once to x's dtype. On a CPU in
/// f32 or bf16 one pass ([`crate::cpu::rope`]); elsewhere candle's `rope_i` on x widened to f32.
/// Both give the same values.
///
/// # Shapes
/// x: (b, h, s, d), cos and sin: (s, d / 2) f32 -> (b, h, s, d)
pub fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, s, d) = x.dims4()?;
    if cos.dims() != [s, d / 2] || sin.dims() != [s, d / 2] || d % 2 != 0 {
        candle_core::bail!(
            "rotary tables {:?} and {:?} do not fit {:?} (need (tokens, head width / 2))",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
    }
    if x.device().is_cpu() && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        fn on_cpu<T: crate::cpu::rope::Pairs>(
            x: &Tensor,
            cos: &Tensor,
            sin: &Tensor,
            (s, d): (usize, usize),
        ) -> Result<Tensor> {
            use crate::cpu::with_slice;
            let out = with_slice::<T, _>(x, |x| {
                with_slice::<f32, _>(cos, |c| {
                    with_slice::<f32, _>(sin, |sn| crate::cpu::rope::rotate_pairs(x, c, sn, s, d))
                })
            })???;
            Tensor::from_vec(out, x.shape(), x.device())
        }
        match x.dtype() {
            DType::F32 => return on_cpu::<f32>(x, cos, sin, (s, d)),
            DType::BF16 => return on_cpu::<half::bf16>(x, cos, sin, (s, d)),
            _ => {}
        }
    }
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&xf, cos, sin)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU kernel gives candle's values bit for bit (f32 and bf16, more tokens than one task
    /// and two heads), and f16 takes candle's path.
    #[test]
    fn the_cpu_kernel_equals_candles_rope_i() {
        let (s, d) = (700, 64);
        let x = crate::nn::test_util::normal((2, 3, s, d), 1.0, 5);
        let angles = Tensor::arange(0f32, (s * d / 2) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.013, 0.0)
            .unwrap()
            .reshape((s, d / 2))
            .unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dt).unwrap();
            let want = candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32).unwrap(), &cos, &sin)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let got = rotate_pairs(&x, &cos, &sin).unwrap();
            assert_eq!(got.dtype(), dt);
            let bits = crate::nn::test_util::bits;
            assert_eq!(bits(&got), bits(&want), "{dt:?}");
        }
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error() {
        let x = Tensor::zeros((1, 2, 5, 8), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::zeros((5, 3), DType::F32, &Device::Cpu).unwrap();
        let e = rotate_pairs(&x, &t, &t).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
