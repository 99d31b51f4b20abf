//! 2-D convolutions with zero padding (the VAE's). Stride 1: candle's, or on the CPU in f32 with
//! AVX-512 the im2col-free kernel of [`crate::cpu::conv`] (weights packed at load, candle's copy
//! dropped); inside [`with_bf16_operands`], with bf16 operands where the CPU has AVX512-BF16 and
//! bf16 weights (f32 input) where it does not.
//! Strided (the encoder's downsamplers): candle's.

use crate::cpu::{
    self,
    conv::{Operands, PackedConv2d},
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
        if !(w.device().is_cpu()
            && w.dtype() == DType::F32
            && w.is_contiguous()
            && cpu::features().avx512)
        {
            return Ok(Self::Candle(c));
        }
        let bias = match c.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        let weights = w.flatten_all()?.to_vec1()?;
        let operands = match (BF16_OPERANDS.with(Cell::get), cpu::features().avx512_bf16) {
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
}

impl Module for Conv2d {
    /// x: (b, c_in, h, w) -> (b, c_out, h, w)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = match self {
            Self::Candle(c) => return c.forward(x),
            Self::Packed(c) => c,
        };
        let (b, ci, h, w) = x.dims4()?;
        let size = c.output_size(h, w);
        let Some((ho, wo)) =
            size.filter(|_| x.dtype() == DType::F32 && x.device().is_cpu() && ci == c.cin())
        else {
            candle_core::bail!(
                "f32 CPU convolution ({} -> {} channels) given {:?} {:?} on {:?}",
                c.cin(),
                c.cout(),
                x.shape(),
                x.dtype(),
                x.device()
            );
        };
        let out = cpu::with_slice::<f32, _>(x, |xs| c.forward(xs, b, h, w))?;
        Tensor::from_vec(out, (b, c.cout(), ho, wo), x.device())
    }
}
