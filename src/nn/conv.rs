//! 2-D convolutions with zero padding (the VAE's). Stride 1: candle's (GPUs), or on the CPU in f32
//! the im2col-free kernel of [`crate::cpu::conv`] (weights packed at load, candle's copy dropped):
//! on AVX-512 our packed kernel, inside [`with_bf16_operands`] with bf16 operands where the CPU
//! has AVX512-BF16 and bf16 weights (f32 input) where it does not; elsewhere (AVX2) the `gemm`
//! crate's f32 kernel on the same band.
//! Strided (the encoder's downsamplers): candle's.
//!
//! Images are (b, c, h, w) as in PyTorch, or channels-last (b, h, w, c) ([`ImageLayout`]), which
//! the packed kernel takes without changing the layout on the way in and out; candle's convolution
//! is given a channels-last image as a permuted view and returns one.

use crate::cpu::{
    self,
    conv::{Operands, PackedConv2d},
    group_norm::ChannelAffine,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static BF16_OPERANDS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` with every packed convolution it makes taking bf16 operands when `on`: a bf16 run's
/// VAE on the CPU, whose tensors stay f32 between layers ([`crate::pipeline::vae_dtype`]). With
/// AVX512-BF16, input and weights are rounded to bf16 (sums in f32); without, the weights are held
/// as bf16 (half the memory) and widened in the f32 kernel, the input staying f32.
pub fn with_bf16_operands<T>(on: bool, build: impl FnOnce() -> T) -> T {
    let outer = BF16_OPERANDS.with(|b| b.replace(on));
    let out = build();
    BF16_OPERANDS.with(|b| b.set(outer));
    out
}

/// How an image tensor's dims are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// (b, c, h, w), as PyTorch and the checkpoints.
    ChannelsFirst,
    /// (b, h, w, c): each pixel's channels side by side, as the CPU kernels read them.
    ChannelsLast,
}

impl ImageLayout {
    /// x (b, c, h, w) in this layout.
    pub fn from_first(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::ChannelsFirst => Ok(x.clone()),
            Self::ChannelsLast => x.permute((0, 2, 3, 1))?.contiguous(),
        }
    }

    /// x in this layout as (b, c, h, w).
    pub fn to_first(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::ChannelsFirst => Ok(x.clone()),
            Self::ChannelsLast => x.permute((0, 3, 1, 2))?.contiguous(),
        }
    }

    /// (b, c, h, w) of x in this layout.
    pub fn dims(self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, d1, d2, d3) = x.dims4()?;
        Ok(match self {
            Self::ChannelsFirst => (b, d1, d2, d3),
            Self::ChannelsLast => (b, d3, d1, d2),
        })
    }

    /// The shape of an image of (b, c, h, w) in this layout.
    pub fn shape(self, (b, c, h, w): (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
        match self {
            Self::ChannelsFirst => (b, c, h, w),
            Self::ChannelsLast => (b, h, w, c),
        }
    }
}

/// `nn.Conv2d(in_c, out_c, k, padding=k // 2)` with bias, from `vb` (`weight`, `bias`).
#[derive(Debug, Clone)]
pub enum Conv2d {
    Candle(candle_nn::Conv2d),
    Packed(Arc<PackedConv2d>),
}

impl Conv2d {
    /// `nn.Conv2d(in_c, out_c, k, stride, padding)` with bias: candle's convolution.
    pub fn strided(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self::Candle(candle_nn::conv2d(in_c, out_c, k, cfg, vb)?))
    }

    pub fn new(in_c: usize, out_c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = candle_nn::Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        let c = candle_nn::conv2d(in_c, out_c, k, cfg, vb)?;
        let w = c.weight();
        // (Non-contiguous weights are views, such as the weight audit's zero-stride stand-ins.)
        if !(w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous()) {
            return Ok(Self::Candle(c));
        }
        let bias = match c.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        let weights = w.flatten_all()?.to_vec1()?;
        let operands = match (BF16_OPERANDS.with(Cell::get), cpu::features().bf16_dot) {
            (true, true) => Operands::Bf16,
            (true, false) => Operands::Bf16Weights,
            (false, _) => Operands::F32,
        };
        Ok(Self::Packed(Arc::new(PackedConv2d::new(
            &weights,
            bias,
            (out_c, in_c, k, k / 2),
            operands,
        ))))
    }

    /// The layout its kernel takes without copies: channels-last for the packed CPU kernel.
    pub fn layout(&self) -> ImageLayout {
        match self {
            Self::Candle(_) => ImageLayout::ChannelsFirst,
            Self::Packed(_) => ImageLayout::ChannelsLast,
        }
    }

    /// [`Self::forward_in`] of x normalised by `norm` ([`crate::nn::GroupNorm::affine_in`], x
    /// channels-last): the packed kernel applies it to each row as it reads x, so the normalised
    /// image is never written whole; candle's is given it written out.
    pub fn forward_after(&self, x: &Tensor, norm: &ChannelAffine) -> Result<Tensor> {
        let last = ImageLayout::ChannelsLast;
        let (b, h, w, ci) = x.dims4()?;
        let fits = x.dtype() == DType::F32 && x.device().is_cpu() && norm.dims() == (b, ci);
        if !fits {
            candle_core::bail!("a GroupNorm of {:?} given {:?}", norm.dims(), x.shape());
        }
        let Self::Packed(c) = self else {
            let normed = cpu::with_slice::<f32, _>(x, |xs| norm.apply_all(xs))?;
            return self.forward_in(&Tensor::from_vec(normed, x.shape(), x.device())?, last);
        };
        let Some((ho, wo)) = c.output_size(h, w).filter(|_| ci == c.cin()) else {
            return Err(refusal(c, x));
        };
        let out =
            cpu::with_slice::<f32, _>(x, |xs| c.forward_channels_last_after(xs, (b, h, w), norm))?;
        Tensor::from_vec(out, last.shape((b, c.cout(), ho, wo)), x.device())
    }

    /// [`Module::forward`] on an image in `layout`, the output in the same layout.
    pub fn forward_in(&self, x: &Tensor, layout: ImageLayout) -> Result<Tensor> {
        let c = match (self, layout) {
            (Self::Candle(c), ImageLayout::ChannelsFirst) => return c.forward(x),
            (Self::Candle(c), last) => return last.from_first(&c.forward(&last.to_first(x)?)?),
            (Self::Packed(c), _) => c,
        };
        let (b, ci, h, w) = layout.dims(x)?;
        let size = c.output_size(h, w);
        let Some((ho, wo)) =
            size.filter(|_| x.dtype() == DType::F32 && x.device().is_cpu() && ci == c.cin())
        else {
            return Err(refusal(c, x));
        };
        let out = cpu::with_slice::<f32, _>(x, |xs| match layout {
            ImageLayout::ChannelsFirst => c.forward(xs, b, h, w),
            ImageLayout::ChannelsLast => c.forward_channels_last(xs, b, h, w),
        })?;
        Tensor::from_vec(out, layout.shape((b, c.cout(), ho, wo)), x.device())
    }
}

/// Why the packed kernel `c` cannot take x.
fn refusal(c: &PackedConv2d, x: &Tensor) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "f32 CPU convolution ({} -> {} channels) given {:?} {:?} on {:?}",
        c.cin(),
        c.cout(),
        x.shape(),
        x.dtype(),
        x.device()
    ))
}

impl Module for Conv2d {
    /// x: (b, c_in, h, w) -> (b, c_out, h, w)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, ImageLayout::ChannelsFirst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{max_abs_diff, normal};
    use crate::nn::GroupNorm;
    use candle_core::Device;

    /// Channels-last and after a GroupNorm, on the packed kernel and on candle's, against candle's
    /// convolution of the channels-first image (normalised first).
    #[test]
    fn layouts_and_normalised_input_equal_candles() {
        let (c, co, g) = (32, 24, 8);
        let vb = |t: Vec<(&str, Tensor)>| {
            let t = t.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
        };
        let conv_vb = vb(vec![
            ("weight", normal((co, c, 3, 3), 0.1, 1)),
            ("bias", normal(co, 0.5, 2)),
        ]);
        let norm_vb = vb(vec![
            ("weight", (normal(c, 0.3, 3) + 1.0).unwrap()),
            ("bias", normal(c, 0.3, 4)),
        ]);
        let norm = GroupNorm::new(g, c, 1e-6, norm_vb).unwrap();
        let packed = Conv2d::new(c, co, 3, conv_vb.clone()).unwrap();
        let candle = Conv2d::strided(c, co, 3, 1, 1, conv_vb).unwrap();
        let x = (normal((2, c, 11, 13), 2.0, 5) + 1.0).unwrap();
        let want = candle.forward(&x).unwrap();
        let want_normed = candle.forward(&norm.forward_silu(&x).unwrap()).unwrap();
        let last = ImageLayout::ChannelsLast;
        let xl = last.from_first(&x).unwrap();
        assert_eq!(last.dims(&xl).unwrap(), (2, c, 11, 13));
        for conv in [&packed, &candle] {
            let got = last.to_first(&conv.forward_in(&xl, last).unwrap()).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-4, "{:?}", conv.layout());
            let Some(affine) = norm.affine_in(&xl, last, true).unwrap() else {
                continue; // (weights off the CPU kernel: the normalisation is candle's)
            };
            let got = last
                .to_first(&conv.forward_after(&xl, &affine).unwrap())
                .unwrap();
            assert!(
                max_abs_diff(&got, &want_normed) < 1e-4,
                "{:?}",
                conv.layout()
            );
        }
    }
}
