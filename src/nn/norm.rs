//! Normalisations: LayerNorm without affine parameters, diffusers' `RMSNorm`, and `GroupNorm`
//! (optionally fused with the SiLU that follows it in the VAE). Each picks its kernel by device,
//! dtype and the CPU feature switch, and each fast path is tested against the composed candle ops.

use super::ImageLayout;
use crate::cpu::{self, group_norm::ChannelAffine};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// LayerNorm over the last dim without learned affine parameters, computed in f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// diffusers' `RMSNorm` over the last dim: `x / sqrt(mean(x^2) + eps) * weight`, statistics in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight (dim) and epsilon, for kernels that fold the norm into another pass.
    pub fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    /// x: (..., dim). On a GPU one fused kernel (statistics in f32); on the CPU in f32 and bf16 one
    /// vectorised pass with the composed path's roundings (the composed path for f16).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward_fused(x);
        }
        if matches!(x.dtype(), DType::F32 | DType::BF16) {
            return cpu::elementwise::rms_norm(x, &self.weight, self.eps);
        }
        self.forward_composed(x)
    }

    /// As diffusers composes it: the norm in f32, rounded to x's dtype, times the weight.
    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }

    /// candle's fused kernel (any device).
    fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight.to_dtype(x.dtype())?,
            self.eps as f32,
        )
    }
}

/// `GroupNorm(groups, c, eps)` with affine parameters (`weight`, `bias`): candle's, or on the CPU in
/// f32 the two-pass kernel of [`cpu::group_norm`] (AVX-512 where the CPU has it), which also folds in
/// a following SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    plain: candle_nn::GroupNorm,
    groups: usize,
    eps: f64,
    /// gamma, beta as f32 when the CPU kernel applies to the weights (contiguous f32 on the CPU).
    affine: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl GroupNorm {
    pub fn new(groups: usize, c: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let (w, b) = (vb.get(c, "weight")?, vb.get(c, "bias")?);
        let plain = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)?;
        // (Non-contiguous weights are views, such as the weight audit's zero-stride stand-ins.)
        let fast = [&w, &b]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous());
        let affine = if fast {
            Some(Arc::new((w.to_vec1()?, b.to_vec1()?)))
        } else {
            None
        };
        Ok(Self {
            plain,
            groups,
            eps,
            affine,
        })
    }

    /// GroupNorm, then SiLU when `silu`, on an image in `layout`: the CPU kernel reads either;
    /// candle's is given a channels-last image permuted.
    pub fn forward_in(&self, x: &Tensor, layout: ImageLayout, silu: bool) -> Result<Tensor> {
        if layout == ImageLayout::ChannelsFirst {
            return self.apply(x, silu);
        }
        match self.affine_in(x, layout, silu)? {
            Some(affine) => {
                let out = cpu::with_slice::<f32, _>(x, |xs| affine.apply_all(xs))?;
                Tensor::from_vec(out, x.shape(), x.device())
            }
            None => layout.from_first(&self.apply(&layout.to_first(x)?, silu)?),
        }
    }

    /// What this GroupNorm (and SiLU when `silu`) does to x channels-last, for a convolution to
    /// apply as it reads x ([`crate::nn::Conv2d::forward_after`]): where the CPU kernel takes x
    /// (f32 on the CPU, channels-last); otherwise None, and the caller normalises x itself.
    pub fn affine_in(
        &self,
        x: &Tensor,
        layout: ImageLayout,
        silu: bool,
    ) -> Result<Option<ChannelAffine>> {
        let Some(ab) = &self.affine else {
            return Ok(None);
        };
        if layout != ImageLayout::ChannelsLast || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let (b, h, w, c) = x.dims4()?;
        if c != ab.0.len() {
            return Ok(None);
        }
        cpu::with_slice::<f32, _>(x, |xs| {
            let g = self.groups;
            cpu::group_norm::channels_last_affine(xs, b, h * w, c, g, &ab.0, &ab.1, self.eps, silu)
        })
        .map(Some)
    }

    /// GroupNorm, then SiLU when `silu`. x: (b, c, ...) -> same shape.
    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        match &self.affine {
            Some(ab)
                if x.dtype() == DType::F32
                    && x.device().is_cpu()
                    && x.rank() >= 2
                    && x.dim(1)? == ab.0.len() =>
            {
                let (b, c) = (x.dim(0)?, x.dim(1)?);
                let hw = x.elem_count() / (b * c).max(1);
                let out = cpu::with_slice::<f32, _>(x, |xs| {
                    cpu::group_norm::group_norm_f32(
                        xs,
                        b,
                        c,
                        hw,
                        self.groups,
                        &ab.0,
                        &ab.1,
                        self.eps,
                        silu,
                    )
                })?;
                Tensor::from_vec(out, x.shape(), x.device())
            }
            _ if silu => self.plain.forward(x)?.silu(),
            _ => self.plain.forward(x),
        }
    }

    /// GroupNorm then SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{compare, max_abs_diff, normal};
    use candle_core::Device;

    #[test]
    fn rms_norm_paths_equal_the_composed_one() {
        let n = RmsNorm::from_weight(normal(16, 1.0, 1), 1e-6);
        let x = normal((2, 3, 5, 16), 4.0, 2);
        let composed = n.forward_composed(&x).unwrap();
        assert!(max_abs_diff(&n.forward_fused(&x).unwrap(), &composed) < 1e-5);
        assert!(max_abs_diff(&n.forward(&x).unwrap(), &composed) < 1e-5);
    }

    /// bf16 on the CPU: the vectorised pass against the composed bf16 path, within one bf16 step
    /// (measured against |b| + 1) on under 1% of elements.
    #[test]
    fn bf16_rms_norm_equals_the_composed_path() {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf((normal((2, 37, 200), 2.0, 1) + 0.5).unwrap());
        let n = RmsNorm::from_weight(bf(normal(200, 1.0, 3)), 1e-6);
        let (rel, differ) = compare(&n.forward(&x).unwrap(), &n.forward_composed(&x).unwrap());
        assert!(
            rel <= 2f32.powi(-7) * 1.01 && differ < 0.01,
            "rel {rel}, differ {differ}"
        );
    }

    /// The CPU kernel (when the feature switch allows it) against candle's GroupNorm and SiLU.
    #[test]
    fn group_norm_equals_candles() {
        let (c, g) = (64, 32);
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), (normal(c, 0.5, 3) + 1.0).unwrap()),
                ("bias".to_string(), normal(c, 0.5, 4)),
            ]
            .into(),
            DType::F32,
            &Device::Cpu,
        );
        let n = GroupNorm::new(g, c, 1e-6, vb).unwrap();
        let x = (normal((2, c, 9, 7), 2.0, 5) + 3.0).unwrap();
        let want = n.plain.forward(&x).unwrap();
        assert!(max_abs_diff(&n.forward(&x).unwrap(), &want) < 2e-5);
        let got = n.forward_silu(&x).unwrap();
        assert!(max_abs_diff(&got, &want.silu().unwrap()) < 2e-5);
        // Channels-last: the kernel's, and candle's (the same layer without the kernel).
        let last = ImageLayout::ChannelsLast;
        let xl = last.from_first(&x).unwrap();
        let plain = GroupNorm {
            affine: None,
            ..n.clone()
        };
        for (n, silu) in [(&n, false), (&n, true), (&plain, false), (&plain, true)] {
            let want = if silu {
                want.silu().unwrap()
            } else {
                want.clone()
            };
            let got = last
                .to_first(&n.forward_in(&xl, last, silu).unwrap())
                .unwrap();
            let kernel = n.affine.is_some();
            assert!(
                max_abs_diff(&got, &want) < 2e-5,
                "silu {silu}, kernel {kernel}"
            );
        }
    }
}
