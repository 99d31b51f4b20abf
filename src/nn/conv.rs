//! 2-D convolutions with zero padding (the VAE's). Stride 1: candle's (GPUs), or on the CPU in f32
//! the im2col-free kernel of [`crate::cpu::conv`] (weights packed straight from a mapped file's
//! bytes on first use when built inside [`super::source::with_source`], else at load from
//! candle's copy, which is then dropped):
//! on AVX-512 our packed kernel, inside [`with_bf16_operands`] with bf16 operands where the CPU
//! has AMX tiles or a fast AVX512-BF16 ([`cpu::Features::bf16_dot`]) and bf16 weights (f32 input)
//! where it has neither; elsewhere (AVX2) the `gemm` crate's f32 kernel on the same band.
//! Strided (the encoder's downsamplers): candle's.
//!
//! Images are (b, c, h, w) as in PyTorch, or channels-last (b, h, w, c) ([`ImageLayout`]), which
//! the packed kernel takes without changing the layout on the way in and out; candle's convolution
//! is given a channels-last image as a permuted view and returns one.

use super::source::{self, changed, deferred, Pack, Pages};
use crate::cpu::{
    self,
    conv::{Operands, PackedConv2d},
    group_norm::ChannelAffine,
    values,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::{bf16, f16};
use std::cell::Cell;
use std::sync::{Arc, LazyLock};

thread_local! {
    static BF16_OPERANDS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` with every packed convolution it makes taking bf16 operands when `on`: a bf16 run's
/// VAE on the CPU, whose tensors stay f32 between layers ([`crate::pipeline::vae_dtype`]). With AMX
/// or a fast AVX512-BF16 ([`cpu::Features::bf16_dot`]), input and weights are rounded to bf16 (sums
/// in f32); with neither, the weights are held as bf16 (half the memory) and widened in the f32
/// kernel, the input staying f32.
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
    /// On the packed CPU kernel: packed at load, or from its source on first use (concurrent first
    /// uses wait for one packing; None when the source no longer had the weight).
    Packed(Arc<LazyLock<Option<PackedConv2d>, Pack<PackedConv2d>>>),
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
        if let Some(c) = Self::from_source((out_c, in_c, k), &vb)? {
            return Ok(c);
        }
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
        let packed = cpu::with_slice::<f32, _>(w, |w| {
            PackedConv2d::new(w, bias, (out_c, in_c, k, k / 2), operands())
        })?;
        Ok(Self::packed(Box::new(move || Some(packed))))
    }

    /// The convolution packed on its first use straight from the [`source::with_source`] bytes of
    /// its weight, when there are such bytes of the right shape (f32, bf16 or f16, aligned) and
    /// the layer is an f32 CPU layer; None to build it the usual way (which names a wrong shape or
    /// a missing tensor). Only the header and the bias are read here.
    fn from_source(
        (out_c, in_c, k): (usize, usize, usize),
        vb: &VarBuilder,
    ) -> Result<Option<Self>> {
        let Some(source) = source::current() else {
            return Ok(None);
        };
        if !(vb.device().is_cpu() && vb.dtype() == DType::F32) {
            return Ok(None);
        }
        let (name, shape) = (vb.pp("weight").prefix(), [out_c, in_c, k, k]);
        let mut packable = false;
        source(&name, Pages::Release, &mut |dtype, s, bytes, _| {
            packable = s == shape
                && match dtype {
                    DType::F32 => values::<f32>(bytes).is_some(),
                    DType::BF16 => values::<bf16>(bytes).is_some(),
                    DType::F16 => values::<f16>(bytes).is_some(),
                    _ => false,
                };
        });
        if !packable {
            return Ok(None);
        }
        let bias = Some(vb.get(out_c, "bias")?.to_dtype(DType::F32)?.to_vec1()?);
        let (dims, operands) = ((out_c, in_c, k, k / 2), operands());
        let pack = deferred(source, name, move |dtype, bytes, _| match dtype {
            DType::F32 => values::<f32>(bytes).map(|w| PackedConv2d::new(w, bias, dims, operands)),
            DType::BF16 => {
                values::<bf16>(bytes).map(|w| PackedConv2d::new(w, bias, dims, operands))
            }
            DType::F16 => values::<f16>(bytes).map(|w| PackedConv2d::new(w, bias, dims, operands)),
            _ => None,
        });
        Ok(Some(Self::packed(pack)))
    }

    fn packed(pack: Pack<PackedConv2d>) -> Self {
        Self::Packed(Arc::new(LazyLock::new(pack)))
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
        let c = LazyLock::force(c).as_ref().ok_or_else(changed)?;
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
            (Self::Packed(c), _) => LazyLock::force(c).as_ref().ok_or_else(changed)?,
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

/// The operands of the packed convolutions being built ([`with_bf16_operands`]): bf16 where a bf16
/// kernel outruns the f32 one, the AMX tiles (on Intel, whose AVX512-BF16 dot products are slower
/// than its f32 FMA) or a fast AVX512-BF16.
fn operands() -> Operands {
    let f = cpu::features();
    match (BF16_OPERANDS.with(Cell::get), f.amx || f.bf16_dot) {
        (true, true) => Operands::Bf16,
        (true, false) => Operands::Bf16Weights,
        (false, _) => Operands::F32,
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

    /// A bf16 run's convolutions take bf16 operands on an AMX machine whatever its AVX512-BF16's
    /// speed (Intel's is below its f32 FMA's, so [`cpu::Features::bf16_dot`] is off there): on
    /// the tiles, not as bf16 weights on the f32 kernel (a decode 3x slower).
    #[test]
    fn bf16_operands_on_amx_whatever_the_dot_products_speed() {
        if !crate::cpu::test_has("amx") {
            return;
        }
        let (c, co) = (64, 24);
        let t = [
            ("weight".to_string(), normal((co, c, 3, 3), 0.1, 1)),
            ("bias".to_string(), normal(co, 0.5, 2)),
        ];
        let vb = VarBuilder::from_tensors(t.into_iter().collect(), DType::F32, &Device::Cpu);
        let conv = with_bf16_operands(true, || Conv2d::new(c, co, 3, vb).unwrap());
        let Conv2d::Packed(packed) = &conv else {
            panic!("not on the packed kernel")
        };
        let packed = LazyLock::force(packed).as_ref().unwrap();
        assert_eq!(packed.operands(), Operands::Bf16);
    }

    /// A convolution built inside `with_source` reads only the header at build, packs the bytes
    /// on its first use, and computes what one built from a `VarBuilder` holding the same values
    /// computes, to the bit: f32, bf16 and f16 bytes, f32 and bf16 operands. Misaligned bytes or a
    /// wrong shape fall back to the `VarBuilder`'s weight.
    #[test]
    fn convolutions_pack_straight_from_the_source_bytes() {
        use crate::nn::source::{with_source, Source, Visit};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (c, co) = (20, 36);
        let w = normal((co, c, 3, 3), 0.1, 11);
        let b = normal(co, 0.5, 12);
        let x = normal((1, c, 7, 9), 1.0, 13);
        let vb = |weight: &Tensor| {
            let t = [("weight", weight.clone()), ("bias", b.clone())];
            let t = t.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
        };
        let source = |file: DType, shift: usize, shape: [usize; 4], reads: Arc<AtomicUsize>| {
            let stored = w.to_dtype(file).unwrap().flatten_all().unwrap();
            let mut bytes = vec![0u8; shift];
            match file {
                DType::F32 => bytes.extend(
                    stored
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes()),
                ),
                DType::BF16 => bytes.extend(
                    stored
                        .to_vec1::<bf16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes()),
                ),
                _ => bytes.extend(
                    stored
                        .to_vec1::<f16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes()),
                ),
            }
            let source: Source = Arc::new(move |name: &str, _: Pages, f: &mut Visit| {
                if name != "weight" {
                    return false;
                }
                // Every visit after the build's header check reads the bytes.
                reads.fetch_add(1, Ordering::SeqCst);
                f(file, &shape, &bytes[shift..], &|_| ());
                true
            });
            source
        };
        let zeros = w.zeros_like().unwrap();
        for bf16_operands in [false, true] {
            if bf16_operands && !crate::cpu::test_has("avx512_bf16") {
                continue;
            }
            for file in [DType::F32, DType::BF16, DType::F16] {
                // The values the file holds, as candle reads them at f32.
                let held = w.to_dtype(file).unwrap().to_dtype(DType::F32).unwrap();
                let run = |conv: &Conv2d| {
                    conv.forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let want = with_bf16_operands(bf16_operands, || {
                    run(&Conv2d::new(c, co, 3, vb(&held)).unwrap())
                });
                let reads = Arc::new(AtomicUsize::new(0));
                let conv = with_bf16_operands(bf16_operands, || {
                    with_source(Some(source(file, 0, [co, c, 3, 3], reads.clone())), || {
                        Conv2d::new(c, co, 3, vb(&zeros)).unwrap()
                    })
                });
                assert_eq!(
                    reads.load(Ordering::SeqCst),
                    1,
                    "the build reads the header once"
                );
                assert_eq!(
                    run(&conv),
                    want,
                    "{file:?} bytes, bf16 operands {bf16_operands}"
                );
                assert_eq!(reads.load(Ordering::SeqCst), 2, "the first use packs");
                run(&conv);
                assert_eq!(reads.load(Ordering::SeqCst), 2, "packed once");
                // Misaligned bytes, a wrong shape: the VarBuilder's values (here zeros: only the
                // bias).
                for (shift, shape) in [(1, [co, c, 3, 3]), (0, [co, c, 1, 9])] {
                    let conv = with_bf16_operands(bf16_operands, || {
                        with_source(Some(source(file, shift, shape, reads.clone())), || {
                            Conv2d::new(c, co, 3, vb(&zeros)).unwrap()
                        })
                    });
                    let fallback = with_bf16_operands(bf16_operands, || {
                        run(&Conv2d::new(c, co, 3, vb(&zeros)).unwrap())
                    });
                    assert_eq!(run(&conv), fallback, "shift {shift}, shape {shape:?}");
                }
            }
        }
    }
}
