//! The arithmetic of adaptive layer norms (diffusers' `AdaLayerNormZero`, `AdaLayerNormContinuous`):
//! a per-sample shift and scale applied to a normalised stream, and a gated residual update; and
//! the position table's add over a batch. On a
//! GPU the norm and modulation are one fused kernel; on the CPU (f32 and bf16) they and the residual
//! update are single parallel vectorised passes that keep the roundings of the composed ops.

use super::norm::layer_norm;
use crate::cpu;
use candle_core::{DType, Result, Tensor};

/// `modulate(layer_norm(x), shift, scale)`. On a GPU one fused kernel per sample (statistics in
/// f32, `1 + scale` and `shift` as the norm's affine parameters); on the CPU in f32 and bf16 one
/// vectorised pass with the composed path's roundings (the composed path for f16).
///
/// # Shapes
/// x: (b, n, d); shift, scale: (b, d) -> (b, n, d)
pub fn norm_modulate(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return cpu::elementwise::norm_modulate(x, eps, shift, scale);
    }
    if x.device().is_cpu() {
        return modulate(&layer_norm(x, eps)?, shift, scale);
    }
    norm_modulate_fused(x, eps, shift, scale)
}

/// The fused path of [`norm_modulate`] (any device; tested against the composed one on the CPU).
fn norm_modulate_fused(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let alpha = (scale.to_dtype(dtype)? + 1.0)?;
    let beta = shift.to_dtype(dtype)?;
    let x = x.contiguous()?;
    let rows = (0..x.dim(0)?)
        .map(|i| {
            candle_nn::ops::layer_norm(
                &x.get(i)?,
                &alpha.get(i)?.contiguous()?,
                &beta.get(i)?.contiguous()?,
                eps as f32,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// `x * (1 + scale) + shift` with per-sample vectors. x: (b, n, d); shift, scale: (b, d)
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `x + gate * y` with a per-sample gate (the gated residual update); f32 and bf16 on the CPU in
/// one pass.
/// x, y: (b, n, d); gate: (b, d)
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu()
        && y.dtype() == x.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
    {
        return cpu::elementwise::add_gated(x, y, gate);
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `x + y` for tensors of one shape and dtype (a residual update); on the CPU in f32 and bf16 one
/// parallel pass, rounded once (candle's bf16 add is slow).
pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if x.device().is_cpu()
        && y.shape() == x.shape()
        && y.dtype() == x.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && d > 0
    {
        let rows = (1, x.elem_count() / d, d);
        return cpu::elementwise::add_over_batch(&x.reshape(rows)?, &y.reshape(rows)?)?
            .reshape(x.shape());
    }
    x + y
}

/// `x + y` with y (1, n, d) broadcast over x's batch (SD3's position table over the patches); on
/// the CPU in f32 and bf16 one parallel pass.
/// x: (b, n, d)
pub fn add_over_batch(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu()
        && y.dtype() == x.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
    {
        return cpu::elementwise::add_over_batch(x, y);
    }
    // Repeated over the batch first: candle's broadcasting add is slow.
    x + y.repeat((x.dim(0)?, 1, 1))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{compare, max_abs_diff, normal};

    #[test]
    fn fused_norm_modulate_equals_the_composed_path() {
        let x = normal((2, 7, 48), 3.0, 1).affine(1.0, 0.5).unwrap();
        let (shift, scale) = (normal((2, 48), 1.0, 2), normal((2, 48), 1.0, 3));
        let a = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
        let b = norm_modulate_fused(&x, 1e-6, &shift, &scale).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5);
    }

    /// f32 on the CPU: the one-pass norm against the composed ops within f32 rounding (statistics
    /// summed in another order, the norm a product by 1 / sigma), the residual update bit for bit.
    #[test]
    fn f32_norm_modulate_and_gate_equal_the_composed_ops() {
        let (b, n, d) = (2, 37, 200);
        let x = (normal((b, n, d), 2.0, 1) + 0.5).unwrap();
        let y = normal((b, n, d), 1.0, 2);
        let (shift, scale) = (normal((b, d), 1.0, 3), normal((b, d), 1.0, 4));
        let want = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
        let (rel, _) = compare(&norm_modulate(&x, 1e-6, &shift, &scale).unwrap(), &want);
        assert!(rel <= 1e-6, "norm: rel {rel}");
        let want = (&x + y.broadcast_mul(&scale.unsqueeze(1).unwrap()).unwrap()).unwrap();
        assert_eq!(
            compare(&add_gated(&x, &y, &scale).unwrap(), &want),
            (0.0, 0.0)
        );
    }

    fn bf16(shape: (usize, usize, usize), std: f32, seed: u64) -> Tensor {
        normal(shape, std, seed).to_dtype(DType::BF16).unwrap()
    }

    /// The bf16 CPU passes against candle's composed bf16 ops: the residual update is bit for bit
    /// equal; the norm differs only where f32 statistics summed in another order tip a rounding
    /// (one bf16 step of the scaled norm, which the shift may then cancel: so measured against
    /// |b| + 1; on under 1% of elements).
    #[test]
    fn bf16_norm_modulate_and_gate_equal_the_composed_ops() {
        let (b, n, d) = (2, 37, 200);
        let x = (bf16((b, n, d), 2.0, 1) + 0.5).unwrap();
        let y = bf16((b, n, d), 1.0, 2);
        let shift = bf16((1, b, d), 1.0, 3).squeeze(0).unwrap();
        let scale = bf16((1, b, d), 1.0, 4).squeeze(0).unwrap();
        let want = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
        let (rel, differ) = compare(&norm_modulate(&x, 1e-6, &shift, &scale).unwrap(), &want);
        assert!(
            rel <= 2f32.powi(-7) * 1.01 && differ < 0.01,
            "norm: rel {rel}, differ {differ}"
        );
        let want = (&x + y.broadcast_mul(&scale.unsqueeze(1).unwrap()).unwrap()).unwrap();
        assert_eq!(
            compare(&add_gated(&x, &y, &scale).unwrap(), &want),
            (0.0, 0.0)
        );
    }

    /// The residual add against candle's, bit for bit (one rounding), f32 and bf16, any rank.
    #[test]
    fn add_equals_candles_add() {
        for dtype in [DType::F32, DType::BF16] {
            let x = normal((2, 5, 37), 2.0, 5).to_dtype(dtype).unwrap();
            let y = normal((2, 5, 37), 1.0, 6).to_dtype(dtype).unwrap();
            assert_eq!(
                compare(&add(&x, &y).unwrap(), &(&x + &y).unwrap()),
                (0.0, 0.0)
            );
            let (x, y) = (x.flatten_all().unwrap(), y.flatten_all().unwrap());
            assert_eq!(
                compare(&add(&x, &y).unwrap(), &(&x + &y).unwrap()),
                (0.0, 0.0)
            );
        }
    }
}
