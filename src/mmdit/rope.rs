//! Flux's rotary position embedding over several id axes (diffusers `FluxPosEmbed` with
//! `get_1d_rotary_pos_embed(..., repeat_interleave_real=True, use_real=True)`; BFL `flux/math.py`).

use candle_core::{Device, Result, Tensor};

/// Per-token cos and sin tables, each (s, head_dim / 2), one entry per frequency (per adjacent
/// channel pair), f32.
#[derive(Debug, Clone)]
pub struct Rope {
    cos_half: Tensor,
    sin_half: Tensor,
}

impl Rope {
    /// ids: one row of `axes.len()` positions per token; axes: rotary dims per axis (even, summing to
    /// the head dim). Angles are computed in f64 as diffusers does, then stored as f32.
    pub fn new(ids: &[Vec<f64>], axes: &[usize], theta: f64, device: &Device) -> Result<Self> {
        let dim: usize = axes.iter().sum();
        let mut cos = Vec::with_capacity(ids.len() * dim);
        let mut sin = Vec::with_capacity(ids.len() * dim);
        for row in ids {
            for (a, &d) in axes.iter().enumerate() {
                let pos = row.get(a).copied().unwrap_or(0.0);
                for k in 0..d / 2 {
                    let freq = 1.0 / theta.powf((2 * k) as f64 / d as f64);
                    let angle = pos * freq;
                    // each frequency covers an adjacent pair of channels
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let s = ids.len();
        Ok(Self {
            cos_half: Tensor::from_vec(cos, (s, dim / 2), device)?,
            sin_half: Tensor::from_vec(sin, (s, dim / 2), device)?,
        })
    }

    /// Rotates adjacent channel pairs: `x * cos + rot(x) * sin` with `rot(x0, x1) = (-x1, x0)`,
    /// computed in f32.
    ///
    /// # Shapes
    /// x: (b, h, s, d) -> (b, h, s, d)
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        // One pass on a CPU, candle's kernel elsewhere; equal to the composed f32 path within f32
        // rounding (tested).
        crate::nn::rotate_pairs(x, &self.cos_half, &self.sin_half)
    }

    /// The cos and sin tables, each (s, head_dim / 2) f32, for kernels that rotate on the way
    /// ([`crate::nn::join_heads_with`]).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos_half, &self.sin_half)
    }

    /// The composed f32 path, as diffusers writes it (the reference for the fused kernel).
    #[cfg(test)]
    fn apply_composed(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::D;
        let (b, h, s, d) = x.dims4()?;
        let dtype = x.dtype();
        // Every frequency twice, for both channels of its pair.
        let full = |t: &Tensor| t.unsqueeze(2)?.repeat((1, 1, 2))?.reshape((s, d));
        let (cos, sin) = (full(&self.cos_half)?, full(&self.sin_half)?);
        let xf = x.to_dtype(candle_core::DType::F32)?;
        let pairs = xf.reshape((b, h, s, d / 2, 2))?;
        let x0 = pairs.narrow(D::Minus1, 0, 1)?;
        let x1 = pairs.narrow(D::Minus1, 1, 1)?;
        let rot = Tensor::cat(&[x1.neg()?, x0], D::Minus1)?.reshape((b, h, s, d))?;
        let cos = cos.unsqueeze(0)?.unsqueeze(0)?;
        let sin = sin.unsqueeze(0)?.unsqueeze(0)?;
        (xf.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_equals_the_composed_path() {
        let dev = Device::Cpu;
        let ids: Vec<Vec<f64>> = (0..5)
            .map(|i| vec![0.0, i as f64, (2 * i) as f64])
            .collect();
        let rope = Rope::new(&ids, &[2, 4, 4], 10000.0, &dev).unwrap();
        let x = crate::nn::test_util::normal((2, 3, 5, 10), 1.0, 1);
        let d = crate::nn::test_util::max_abs_diff(
            &rope.apply_composed(&x).unwrap(),
            &rope.apply(&x).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let dev = Device::Cpu;
        let rope = Rope::new(&[vec![0.0, 0.0], vec![3.0, 5.0]], &[2, 4], 10000.0, &dev).unwrap();
        let x = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((1, 1, 2, 6))
            .unwrap();
        let y = rope.apply(&x).unwrap();
        let xv: Vec<Vec<f32>> = x.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let yv: Vec<Vec<f32>> = y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(xv[0], yv[0]);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&xv[1]) - n(&yv[1])).abs() < 1e-3);
        // first pair rotated by angle 3 (axis 0, freq 1)
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((yv[1][0] - (6.0 * c - 7.0 * s)).abs() < 1e-5);
    }
}
