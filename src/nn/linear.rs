//! Linear layers: candle's `Linear`, except on the CPU where a faster kernel exists: in bf16 with
//! AMX, the weight is packed once at load into AMX tiles and products run on [`crate::cpu::amx`];
//! in f32 with AVX-512, it is packed into 32-column panels for [`crate::cpu::sgemm`]; in bf16 with
//! AVX512-BF16 but no AMX, into pairs of k for its dot products ([`crate::cpu::dpbf16`]); in bf16 with
//! AVX-512 alone, into bf16 panels of the f32 kernel, computed in f32. Either way candle's copy of the
//! weight is dropped, and a bf16 product is rounded once, after the bias (as PyTorch's).
//!
//! How a layer's weight is held is its `Kernel`; quantized weights (GGML blocks, as a GGUF file
//! stores them, computed in place on [`crate::cpu::qgemm`]) are a further kernel, and a LoRA delta applied at run time is a term added to
//! [`Linear::forward`]'s output, so the models that hold `Linear`s do not change for either.

use super::lora::{self, Slot};
use super::quant;
use super::source::{self, changed, deferred, Pack, Pages, Source};
use crate::cpu::amx::{self, PackedB};
use crate::cpu::bf16_weight;
use crate::cpu::dpbf16::{self, PackedPairs};
use crate::cpu::qgemm::{self, QWeight};
use crate::cpu::sgemm::{self, PackedBf16, PackedF32, RowValues};
use crate::cpu::{bytes_of, values};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

thread_local! {
    static IN_PLACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `build` with every layer it makes from a [`source::with_source`] weight for the f32
/// kernel's panels (f32, and bf16 without AMX or a fast AVX512-BF16) reading that weight where the
/// source holds it on its first [`IN_PLACE_RUNS`] products ([`sgemm::Rows`]), and packing it only
/// on the next: for layers that may run too few times to repay the copy -- a text encoder runs once
/// per prompt, and a copy's fresh pages cost more than the transposes its products make in place.
/// The products are the packed ones, to the bit.
pub fn read_in_place<T>(build: impl FnOnce() -> T) -> T {
    let outer = IN_PLACE.with(|c| c.replace(true));
    let out = build();
    IN_PLACE.with(|c| c.set(outer));
    out
}

/// `y = x Wᵀ + b` (diffusers' and PyTorch's `nn.Linear`), plus the run-time LoRA term of its slot
/// when one is set ([`super::lora`]).
#[derive(Debug, Clone)]
pub struct Linear {
    kernel: Kernel,
    lora: Option<Arc<Slot>>,
}

/// Where a layer's product runs, and the weight in the layout that kernel takes.
#[derive(Debug, Clone)]
enum Kernel {
    /// candle's matmul (GPUs; CPUs without a faster kernel for the dtype).
    Candle(candle_nn::Linear),
    /// bf16 on AMX tiles.
    Amx(Arc<Packed<PackedB>>),
    /// f32 on AVX-512.
    Avx512(Arc<Packed<PackedF32>>),
    /// f32 (or bf16 on the f32 kernel's panels) on AVX-512, its first products reading the weight
    /// where its file holds it, the next packing it ([`read_in_place`]).
    Avx512InPlace(Arc<InPlace>),
    /// bf16 on AVX512-BF16 dot products, without AMX.
    Dpbf16(Arc<Packed<PackedPairs>>),
    /// bf16 on AVX-512 without AMX or AVX512-BF16: bf16 panels, f32 arithmetic.
    Avx512Bf16(Arc<Packed<PackedBf16>>),
    /// GGML blocks on AVX-512 VNNI ([`super::quant`]), as the file stores them; f32 or bf16 in,
    /// the bias added to the f32 sums.
    Blocks(Arc<Packed<QWeight>>),
    /// GGML blocks on candle's quantized kernels, where VNNI is missing; f32 in and out, the bias
    /// added in f32.
    Quantized(Arc<QMatMul>, Option<Tensor>),
    /// f32 or bf16 without a packing kernel for it (CPUs without AVX-512), read where the weight
    /// file holds it on every product.
    Mapped(Arc<Mapped>),
}

/// A weight packed for a CPU kernel, and the bias in f32 (added once, to the f32 accumulators). A
/// layer built from a [`source::with_source`] holds how to pack its weight instead, and packs it on
/// its first product ([`Packed::weight`]; concurrent first products wait for one packing).
#[derive(Debug)]
struct Packed<P> {
    weight: LazyLock<Option<P>, Pack<P>>,
    bias: Option<Vec<f32>>,
}

impl<P: Send + 'static> Packed<P> {
    /// A weight packed now.
    fn new(weight: P, bias: Option<Vec<f32>>) -> Self {
        Self::deferred(Box::new(move || Some(weight)), bias)
    }

    /// A weight packed by `pack` on first use.
    fn deferred(pack: Pack<P>, bias: Option<Vec<f32>>) -> Self {
        Self {
            weight: LazyLock::new(pack),
            bias,
        }
    }

    /// The packed weight, packing it first if this is its first use.
    fn weight(&self) -> Result<&P> {
        LazyLock::force(&self.weight).as_ref().ok_or_else(changed)
    }
}

/// A weight that its first [`IN_PLACE_RUNS`] products read where a [`Source`] holds it, and the
/// next packs; whether the layer is bf16 (the f32 kernel on bf16 values: rounded from f32 bytes as
/// they are read or packed), and the bias in f32.
struct InPlace {
    source: Source,
    name: String,
    n: usize,
    k: usize,
    bf16: bool,
    bias: Option<Vec<f32>>,
    /// Products begun so far.
    runs: AtomicUsize,
    /// The panels once packed (None: the source no longer had the weight).
    packed: OnceLock<Option<InPlacePanels>>,
}

/// How many products of an [`InPlace`] layer read its weight in place before one packs it: a
/// generation encodes at most two prompts (its own and classifier-free guidance's negative), so a
/// single run never packs, and a layer that keeps running (a server, a batch, a benchmark's
/// repeats) runs on packed panels from its third product.
const IN_PLACE_RUNS: usize = 2;

/// An [`InPlace`] layer's packed panels.
enum InPlacePanels {
    F32(PackedF32),
    Bf16(PackedBf16),
}

impl InPlace {
    /// The panels from the source, packed as a packed layer of the same dtype packs them.
    fn pack(&self) -> Option<InPlacePanels> {
        let (n, k, mut out) = (self.n, self.k, None);
        (self.source)(
            &self.name,
            Pages::Release,
            &mut |dtype, shape, bytes, done| {
                if shape != [n, k] {
                    return;
                }
                out = match (dtype, self.bf16) {
                    (DType::F32, false) => values::<f32>(bytes).map(|w| {
                        InPlacePanels::F32(PackedF32::from_nk_with(w, n, k, |r| done(bytes_of(r))))
                    }),
                    (_, true) => with_bf16(dtype, bytes, done, |w| {
                        InPlacePanels::Bf16(PackedBf16::from_nk(w, n, k))
                    }),
                    _ => None,
                };
            },
        );
        out
    }
}

impl std::fmt::Debug for InPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InPlace({}, {} x {})", self.name, self.n, self.k)
    }
}

/// diffusers' `nn.Linear(in_dim, out_dim)` with bias, from `vb` (`weight`, `bias`); inside
/// [`lora::collect`], with a run-time LoRA slot under `vb`'s prefix.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    build(in_dim, out_dim, vb, true)
}

/// `nn.Linear(in_dim, out_dim, bias=False)` from `vb` (`weight`), built as [`linear`] is.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    build(in_dim, out_dim, vb, false)
}

/// [`linear`] or [`linear_no_bias`] as the checkpoint has it (FLUX.2's layers have no biases).
pub fn linear_with(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    build(in_dim, out_dim, vb, bias)
}

fn build(in_dim: usize, out_dim: usize, vb: VarBuilder, bias: bool) -> Result<Linear> {
    let mut l = match quant::stored(&format!("{}.weight", vb.prefix())) {
        Some(blocks) => {
            let w = blocks?;
            if w.shape != [out_dim, in_dim] {
                // The error candle's own backends give.
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {}.weight", vb.prefix()),
                    expected: (out_dim, in_dim).into(),
                    got: w.shape.clone().into(),
                });
            }
            let b = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
            Linear::from_blocks(w, b)?
        }
        None => match from_source(in_dim, out_dim, bias, &vb)? {
            Some(l) => l,
            None => {
                let plain = match bias {
                    true => candle_nn::linear(in_dim, out_dim, vb.clone())?,
                    false => candle_nn::linear_no_bias(in_dim, out_dim, vb.clone())?,
                };
                match quant::current() {
                    Some(q) => Linear::quantized(plain, q)?,
                    None => Linear::new(plain)?,
                }
            }
        },
    };
    l.lora = lora::register(&vb.prefix());
    Ok(l)
}

/// The layer packed straight from the [`source::with_source`] bytes of its weight on its first
/// product, when there are such bytes of the right shape, the CPU has a packing kernel for the
/// layer's dtype and the bytes are aligned for their type, and the layer is not being quantized;
/// without such a kernel, the layer reading bytes of its own dtype where they lie
/// ([`Kernel::Mapped`]); None to build it the usual way. Only the dtype, shape and alignment are
/// read here (no page of the bytes).
fn from_source(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: &VarBuilder,
) -> Result<Option<Linear>> {
    let Some(source) = source::current() else {
        return Ok(None);
    };
    if !vb.device().is_cpu() || quant::current().is_some() {
        return Ok(None);
    }
    let (want, cpu, (n, k)) = (vb.dtype(), crate::cpu::features(), (out_dim, in_dim));
    let name = format!("{}.weight", vb.prefix());
    // Without a packing kernel for the layer's dtype, the products read the weight where it lies,
    // when the file stores it in that dtype.
    let mapped = match want {
        DType::F32 => !cpu.avx512,
        _ => !bf16_kernel(),
    };
    let mut packable = false;
    source(&name, Pages::Release, &mut |dtype, shape, bytes, _| {
        // (A wrong shape: the usual path names the mismatch.)
        packable = shape == [n, k]
            && match (want, dtype) {
                (DType::F32, DType::F32) => values::<f32>(bytes).is_some(),
                (DType::BF16, DType::BF16) => values::<bf16>(bytes).is_some(),
                (DType::BF16, DType::F32) => !mapped && values::<f32>(bytes).is_some(),
                _ => false,
            };
    });
    if !packable {
        return Ok(None);
    }
    let bias = match bias {
        true => Some(vb.get(out_dim, "bias")?.to_dtype(DType::F32)?.to_vec1()?),
        false => None,
    };
    if mapped {
        return Ok(Some(Linear::of(Kernel::Mapped(Arc::new(Mapped {
            source,
            name,
            n,
            k,
            dtype: want,
            bias,
        })))));
    }
    // In place where the layer would run on the f32 kernel's panels (f32, or bf16 without AMX or
    // AVX512-BF16, whose layouts are packed).
    let panels = want == DType::F32 || !(cpu.amx || cpu.bf16_dot);
    Ok(Some(Linear::of(if panels && IN_PLACE.with(|c| c.get()) {
        Kernel::Avx512InPlace(Arc::new(InPlace {
            source,
            name,
            n,
            k,
            bf16: want == DType::BF16,
            bias,
            runs: AtomicUsize::new(0),
            packed: OnceLock::new(),
        }))
    } else if want == DType::F32 {
        Kernel::Avx512(Arc::new(Packed::deferred(
            deferred(source, name, move |_, b, done| {
                values::<f32>(b).map(|w| PackedF32::from_nk_with(w, n, k, |r| done(bytes_of(r))))
            }),
            bias,
        )))
    } else if cpu.amx {
        Kernel::Amx(Arc::new(Packed::deferred(
            deferred(source, name, move |d, b, done| {
                // From f32 bytes rounded in runs of column blocks, without a bf16 copy.
                match d {
                    DType::F32 => values::<f32>(b)
                        .map(|w| PackedB::from_nk_rounded(w, n, k, |r| done(bytes_of(r)))),
                    _ => with_bf16(d, b, done, |w| PackedB::from_nk(w, n, k)),
                }
            }),
            bias,
        )))
    } else if cpu.bf16_dot {
        Kernel::Dpbf16(Arc::new(Packed::deferred(
            deferred(source, name, move |d, b, done| {
                // From f32 bytes rounded a panel at a time, without a bf16 copy of the weight.
                match d {
                    DType::F32 => values::<f32>(b)
                        .map(|w| PackedPairs::from_nk_rounded(w, n, k, |r| done(bytes_of(r)))),
                    _ => with_bf16(d, b, done, |w| PackedPairs::from_nk(w, n, k)),
                }
            }),
            bias,
        )))
    } else {
        Kernel::Avx512Bf16(Arc::new(Packed::deferred(
            deferred(source, name, move |d, b, done| {
                with_bf16(d, b, done, |w| PackedBf16::from_nk(w, n, k))
            }),
            bias,
        )))
    })))
}

/// Whether the CPU has a kernel that packs bf16 weights (the choice [`Linear::new`] makes).
fn bf16_kernel() -> bool {
    let cpu = crate::cpu::features();
    cpu.amx || cpu.avx512_bf16 || cpu.avx512
}

/// `f` of a weight's bytes as bf16 values: as stored, or rounded from f32 (as candle's conversion
/// rounds; each slab of f32 bytes passed to `done` once rounded); None when they are neither or
/// not aligned.
fn with_bf16<R>(
    dtype: DType,
    bytes: &[u8],
    done: &dyn Fn(&[u8]),
    f: impl FnOnce(&[bf16]) -> R,
) -> Option<R> {
    match dtype {
        DType::BF16 => values::<bf16>(bytes).map(f),
        DType::F32 => values::<f32>(bytes).map(|w| f(&crate::cpu::rounded_to_bf16(w, done))),
        _ => None,
    }
}

impl Linear {
    /// Wraps candle's layer, packing it for AMX when it is a bf16 CPU layer and AMX is available,
    /// or for the AVX-512 kernel when it is an f32 CPU layer and AVX-512 is (the feature switch,
    /// [`crate::cpu::features`]).
    pub fn new(l: candle_nn::Linear) -> Result<Self> {
        let w = l.weight();
        // (A non-contiguous weight is a view, such as the zero-stride stand-ins of the weight
        // audit: packing it would materialise it. Loaded weights are contiguous.)
        if !(w.device().is_cpu() && w.rank() == 2 && w.is_contiguous()) {
            return Ok(Self::of(Kernel::Candle(l)));
        }
        let (n, k) = w.dims2()?;
        let cpu = crate::cpu::features();
        let bias = || match l.bias() {
            Some(b) => Ok::<_, candle_core::Error>(Some(b.to_dtype(DType::F32)?.to_vec1()?)),
            None => Ok(None),
        };
        Ok(Self::of(match w.dtype() {
            DType::F32 if cpu.avx512 => Kernel::Avx512(Arc::new(Packed::new(
                crate::cpu::with_slice(w, |w| PackedF32::from_nk(w, n, k))?,
                bias()?,
            ))),
            DType::BF16 if cpu.amx => Kernel::Amx(Arc::new(Packed::new(
                crate::cpu::with_slice(w, |w| PackedB::from_nk(w, n, k))?,
                bias()?,
            ))),
            DType::BF16 if cpu.bf16_dot => Kernel::Dpbf16(Arc::new(Packed::new(
                crate::cpu::with_slice(w, |w| PackedPairs::from_nk(w, n, k))?,
                bias()?,
            ))),
            DType::BF16 if cpu.avx512 => Kernel::Avx512Bf16(Arc::new(Packed::new(
                crate::cpu::with_slice(w, |w| PackedBf16::from_nk(w, n, k))?,
                bias()?,
            ))),
            _ => Kernel::Candle(l),
        }))
    }

    fn of(kernel: Kernel) -> Self {
        Self { kernel, lora: None }
    }

    /// The layer with its weight quantized to `dtype` (or its fallback, [`quant::fit`]) on the
    /// CPU, when its input width is a whole number of blocks; otherwise as [`Linear::new`] makes it.
    pub fn quantized(l: candle_nn::Linear, dtype: GgmlDType) -> Result<Self> {
        let w = l.weight();
        let fit = match w.rank() {
            2 => quant::fit(dtype, w.dim(1)?),
            _ => None,
        };
        let Some(dtype) = fit.filter(|_| w.device().is_cpu() && w.is_contiguous()) else {
            return Self::new(l);
        };
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?;
        let stored = quant::StoredWeight {
            dtype,
            shape: w.dims().to_vec(),
            bytes: q.data()?.into_owned(),
        };
        drop(q);
        Self::from_blocks(stored, l.bias().cloned())
    }

    /// A layer on a weight already in GGML blocks (a GGUF file's), with its bias if it has one:
    /// on [`qgemm`] where the CPU has VNNI, else on candle's quantized kernels.
    pub fn from_blocks(weight: quant::StoredWeight, bias: Option<Tensor>) -> Result<Self> {
        let quant::StoredWeight {
            dtype,
            shape,
            bytes,
        } = weight;
        let &[n, k] = shape.as_slice() else {
            candle_core::bail!("GGML blocks of shape {shape:?} given to a linear layer");
        };
        if qgemm::available() && qgemm::group(dtype).is_some() {
            let bias = match bias {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
                None => None,
            };
            let weight = QWeight::new(dtype, n, k, bytes).map_err(candle_core::Error::Msg)?;
            return Ok(Self::of(Kernel::Blocks(Arc::new(Packed::new(
                weight, bias,
            )))));
        }
        Ok(Self::of(Kernel::Quantized(
            Arc::new(QMatMul::from_qtensor(quant::qtensor(
                dtype, shape, &bytes,
            )?)?),
            bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        )))
    }

    /// Whether the weight is held in GGML blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self.kernel, Kernel::Blocks(_) | Kernel::Quantized(..))
    }

    /// Whether the GGML blocks run on our VNNI kernel ([`qgemm`]).
    pub fn is_vnni(&self) -> bool {
        matches!(self.kernel, Kernel::Blocks(_))
    }

    /// Whether products run on AMX tiles.
    pub fn is_amx(&self) -> bool {
        matches!(self.kernel, Kernel::Amx(_))
    }

    /// Whether products run on an AVX-512 kernel (f32, bf16 panels, or AVX512-BF16 pairs).
    pub fn is_avx512(&self) -> bool {
        matches!(
            self.kernel,
            Kernel::Avx512(_)
                | Kernel::Avx512InPlace(_)
                | Kernel::Avx512Bf16(_)
                | Kernel::Dpbf16(_)
        )
    }

    /// `x Wᵀ + b` as f32 sums not yet rounded to `x`'s dtype, for the kernels that form them apart
    /// from their rounding: candle's product of a bf16 layer on the CPU ([`widened_sums`]) and
    /// candle's quantized kernels; with `x` in f32, as they widened it. None for the others (which
    /// round inside, or work in f32).
    fn f32_sums(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        Ok(Some(match &self.kernel {
            Kernel::Candle(l) if x.device().is_cpu() && x.dtype() == DType::BF16 => {
                widened_sums(l, x)?
            }
            Kernel::Quantized(q, bias) => quantized_sums(q, bias.as_ref(), x)?,
            Kernel::Mapped(w) => w.sums(x)?,
            _ => return Ok(None),
        }))
    }

    /// `x Wᵀ + b` without the LoRA term.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Candle(l) if x.device().is_cpu() && x.dtype() == DType::BF16 => {
                from_f32(&widened_sums(l, x)?.0, DType::BF16)
            }
            Kernel::Candle(l) if is_cpu_f32(l, x) => rows_invariant_product(l, x),
            Kernel::Candle(l) => l.forward(x),
            Kernel::Mapped(w) => from_f32(&w.sums(x)?.0, x.dtype()),
            Kernel::Amx(p) => amx_forward(x, p, false),
            Kernel::Avx512(p) => sgemm_forward(x, p, None, false, "AVX-512"),
            Kernel::Avx512InPlace(w) => rows_forward(x, w, None, false),
            Kernel::Avx512Bf16(p) => sgemm_forward(x, p, None, false, "AVX-512 bf16"),
            Kernel::Dpbf16(p) => dpbf16_forward(x, p, None, false),
            Kernel::Blocks(p) => {
                let w = p.weight()?;
                let (k, n) = (w.k(), w.n());
                let y = match x.dtype() {
                    DType::BF16 => packed_forward::<bf16>(x, k, n, "GGML blocks", |a, m, out| {
                        let mut acc = vec![0f32; m * n];
                        qgemm::matmul(a, m, w, p.bias.as_deref(), &mut acc);
                        for (o, v) in out.iter_mut().zip(acc) {
                            *o = crate::cpu::round_bf16(v);
                        }
                    })?,
                    // f32, and f16 by way of f32.
                    dtype => packed_forward::<f32>(
                        &x.to_dtype(DType::F32)?,
                        k,
                        n,
                        "GGML blocks",
                        |a, m, out| qgemm::matmul(a, m, w, p.bias.as_deref(), out),
                    )?
                    .to_dtype(dtype)?,
                };
                Ok(y)
            }
            Kernel::Quantized(q, bias) => {
                from_f32(&quantized_sums(q, bias.as_ref(), x)?.0, x.dtype())
            }
        }
    }

    /// `gelu_tanh(self.forward(x))`. On the AVX-512, AVX512-BF16 and AMX kernels without an
    /// active LoRA the GELU is applied to each output tile as the kernel writes it
    /// ([`sgemm::matmul_vec`], [`sgemm::matmul_bf16_vec`], [`dpbf16::matmul_bf16_vec`],
    /// [`amx::matmul_gelu`]): the same values, without a pass over the output of its own.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let lora = self.lora.as_ref().and_then(|s| s.get()).is_some();
        match &self.kernel {
            Kernel::Avx512(p) if !lora => sgemm_forward(x, p, None, true, "AVX-512"),
            Kernel::Avx512InPlace(w) if !lora => rows_forward(x, w, None, true),
            Kernel::Avx512Bf16(p) if !lora => sgemm_forward(x, p, None, true, "AVX-512 bf16"),
            Kernel::Dpbf16(p) if !lora => dpbf16_forward(x, p, None, true),
            Kernel::Amx(p) if !lora => amx_forward(x, p, true),
            _ => super::activation::gelu_tanh(&self.forward(x)?),
        }
    }
}

/// A layer on the AVX-512 kernel, plus a LoRA term added to the same f32 accumulators; through the
/// tanh-GELU as the kernel stores each tile with `gelu` (never with a LoRA term). f32 layers take
/// f32; bf16 layers (bf16 panels) take bf16, widened exactly, their f32 sums rounded once as the
/// kernel stores them -- or, with a LoRA term, after it, on an f32 copy of the input.
fn sgemm_forward<E: sgemm::PanelElem>(
    x: &Tensor,
    p: &Packed<sgemm::Packed<E>>,
    delta: Option<&lora::Delta>,
    gelu: bool,
    kernel: &str,
) -> Result<Tensor> {
    packed_panels_forward(x, p.weight()?, p.bias.as_deref(), delta, gelu, kernel)
}

/// [`panels_forward`] on packed panels (f32 or bf16: the layer's dtype).
fn packed_panels_forward<E: sgemm::PanelElem>(
    x: &Tensor,
    w: &sgemm::Packed<E>,
    bias: Option<&[f32]>,
    delta: Option<&lora::Delta>,
    gelu: bool,
    kernel: &str,
) -> Result<Tensor> {
    let panels = Panels {
        w,
        bf16: E::BF16,
        bias,
    };
    panels_forward(x, panels, delta, gelu, kernel)
}

/// B of the AVX-512 kernel as a layer holds it: packed panels or its weight where a file holds it
/// (`w`), whether the panels hold bf16 (the layer's dtype), the bias in f32.
struct Panels<'a, B> {
    w: &'a B,
    bf16: bool,
    bias: Option<&'a [f32]>,
}

/// [`sgemm_forward`] on any operand of the kernel.
fn panels_forward<B: sgemm::Panels>(
    x: &Tensor,
    Panels { w, bf16, bias }: Panels<B>,
    delta: Option<&lora::Delta>,
    gelu: bool,
    kernel: &str,
) -> Result<Tensor> {
    let (k, n) = (w.k(), w.n());
    let want = if bf16 { DType::BF16 } else { DType::F32 };
    if x.dtype() != want {
        candle_core::bail!("{kernel} linear ({k} -> {n}) given {:?}", x.dtype());
    }
    assert!(
        !gelu || delta.is_none(),
        "the GELU is folded only without a LoRA term"
    );
    // Outputs written once, without zeroing them first.
    if bf16 && delta.is_none() {
        return packed_forward_vec(x, k, n, kernel, |a, m| {
            sgemm::matmul_bf16_vec(a, m, k, w, bias, gelu)
        });
    }
    let xf = x.to_dtype(DType::F32)?;
    let y = packed_forward_vec(&xf, k, n, kernel, |a, m| {
        let mut out = sgemm::matmul_vec(a, m, k, w, bias, gelu);
        if let Some(d) = delta {
            d.add_packed(a, m, &mut out);
        }
        out
    })?;
    y.to_dtype(want)
}

/// An [`InPlace`] layer's product, through [`panels_forward`]: on its weight where the source
/// holds it ([`sgemm::Rows`]) for its first [`IN_PLACE_RUNS`] products, on panels packed by the
/// next after; an error when the source no longer hands out its n x k values.
fn rows_forward(
    x: &Tensor,
    w: &InPlace,
    delta: Option<&lora::Delta>,
    gelu: bool,
) -> Result<Tensor> {
    let kernel = if w.bf16 { "AVX-512 bf16" } else { "AVX-512" };
    let bias = w.bias.as_deref();
    if w.runs.fetch_add(1, Ordering::Relaxed) >= IN_PLACE_RUNS {
        return match w.packed.get_or_init(|| w.pack()).as_ref() {
            Some(InPlacePanels::F32(p)) => packed_panels_forward(x, p, bias, delta, gelu, kernel),
            Some(InPlacePanels::Bf16(p)) => packed_panels_forward(x, p, bias, delta, gelu, kernel),
            None => Err(changed()),
        };
    }
    let mut out = None;
    (w.source)(&w.name, Pages::Release, &mut |dtype, shape, bytes, _| {
        let values = match (dtype, w.bf16) {
            (DType::F32, false) => values::<f32>(bytes).map(RowValues::F32),
            (DType::F32, true) => values::<f32>(bytes).map(RowValues::F32AsBf16),
            (DType::BF16, true) => values::<bf16>(bytes).map(RowValues::Bf16),
            _ => None,
        };
        if let (Some(values), true) = (values, shape == [w.n, w.k]) {
            let panels = Panels {
                w: &sgemm::Rows::new(values, w.n, w.k),
                bf16: w.bf16,
                bias,
            };
            out = Some(panels_forward(x, panels, delta, gelu, kernel));
        }
    });
    out.unwrap_or_else(|| Err(changed()))
}

/// A layer on the AVX512-BF16 kernel: bf16 in, f32 sums rounded once as the kernel stores them
/// (through the GELU with `gelu`); with a LoRA term (added to the f32 sums, on the exactly widened
/// input), rounded after it.
fn dpbf16_forward(
    x: &Tensor,
    p: &Packed<PackedPairs>,
    delta: Option<&lora::Delta>,
    gelu: bool,
) -> Result<Tensor> {
    let w = p.weight()?;
    let (k, n) = (w.k(), w.n());
    let bias = p.bias.as_deref();
    let Some(d) = delta else {
        // The output written once, without zeroing it first.
        return packed_forward_vec(x, k, n, "AVX512-BF16", |a, m| {
            dpbf16::matmul_bf16_vec(a, m, k, w, bias, gelu)
        });
    };
    assert!(!gelu, "the GELU is folded only without a LoRA term");
    packed_forward::<bf16>(x, k, n, "AVX512-BF16", |a, m, out| {
        let mut acc = vec![0f32; m * n];
        dpbf16::matmul(a, m, k, w, bias, &mut acc, n);
        let af: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        d.add_packed(&af, m, &mut acc);
        crate::cpu::elementwise::round_to_bf16(&acc, out);
    })
}

impl Module for Linear {
    /// x: (.., in) -> (.., out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(delta) = self.lora.as_ref().and_then(|s| s.get()) else {
            return self.product(x);
        };
        let y = match &self.kernel {
            Kernel::Avx512(p) if delta.is_packed() => {
                sgemm_forward(x, p, Some(&delta), false, "AVX-512")
            }
            Kernel::Avx512Bf16(p) if delta.is_packed() => {
                sgemm_forward(x, p, Some(&delta), false, "AVX-512 bf16")
            }
            Kernel::Avx512InPlace(w) if delta.is_packed() => {
                rows_forward(x, w, Some(&delta), false)
            }
            Kernel::Dpbf16(p) if delta.is_packed() => dpbf16_forward(x, p, Some(&delta), false),
            // The term added to the f32 sums, rounded once with them, as the packed kernels do.
            _ => match self.f32_sums(x)? {
                Some((y, xf)) => from_f32(&(y + delta.forward(&xf)?)?, x.dtype()),
                None => self.product(x)? + delta.forward(x)?,
            },
        }?;
        delta.rescale(y)
    }
}

/// A bf16 layer on a CPU without our bf16 kernels: the f32 product of the widened values plus the
/// bias, to be rounded to bf16 once, as the packed kernels and PyTorch do (candle's bf16 matmul on
/// the CPU widens both operands too, but rounds the product, and its layer then rounds the sum with
/// the bias a second time); with `x` as f32. The weight is read as stored ([`Weight::Bf16`]).
fn widened_sums(l: &candle_nn::Linear, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, k) = l.weight().dims2()?;
    if x.dim(candle_core::D::Minus1)? != k || l.weight().dtype() != DType::BF16 {
        // A weight of another dtype (or candle's error for a width that does not match): candle's
        // f32 product of the widened values.
        let xf = to_f32(x)?;
        let bias = l.bias().map(to_f32).transpose()?;
        let y = candle_nn::Linear::new(to_f32(l.weight())?, bias).forward(&xf)?;
        return Ok((y, xf));
    }
    let bias = f32_bias(l)?;
    let (x, w) = (&to_f32(x)?, l.weight());
    let y = crate::cpu::with_slice::<bf16, _>(w, |w| {
        rows_sums(x, n, |a, m| {
            Weight::Bf16(w).sums(a, m, (n, k), bias.as_deref())
        })
    })??;
    Ok((y, x.clone()))
}

/// A candle layer's bias as f32 values.
fn f32_bias(l: &candle_nn::Linear) -> Result<Option<Vec<f32>>> {
    l.bias().map(|b| to_f32(b)?.to_vec1::<f32>()).transpose()
}

/// Whether `x` and the layer's (contiguous) weight are f32 CPU tensors: a layer on
/// [`rows_invariant_product`].
fn is_cpu_f32(l: &candle_nn::Linear, x: &Tensor) -> bool {
    let w = l.weight();
    x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && w.is_contiguous()
}

/// An f32 layer on a CPU without AVX-512: candle's product on the `gemm` crate, called so that each
/// row's values are the same whatever rows are multiplied beside it ([`Weight::F32`]; candle's own
/// call picks the crate's kernel by the row count, so an image of a batch came out a few ulps off
/// the same image run alone), plus the bias.
fn rows_invariant_product(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let (n, k) = l.weight().dims2()?;
    if x.dim(candle_core::D::Minus1)? != k {
        // candle's error for a width that does not match.
        return l.forward(x);
    }
    let bias = f32_bias(l)?;
    crate::cpu::with_slice::<f32, _>(l.weight(), |w| {
        rows_sums(x, n, |a, m| {
            Weight::F32(w).sums(a, m, (n, k), bias.as_deref())
        })
    })?
}

/// A weight's values (n x k, row-major, PyTorch's layout) as the products without a packed kernel
/// read them: from a candle tensor or where a weight file holds them ([`Kernel::Mapped`]).
#[derive(Clone, Copy)]
enum Weight<'a> {
    /// On [`crate::cpu::gemm_f32`]: each row's values independent of the rows beside it.
    F32(&'a [f32]),
    /// Widened exactly as [`bf16_weight`] reads it: a few rows in registers, more a block of the
    /// weight at a time.
    Bf16(&'a [bf16]),
}

impl Weight<'_> {
    /// `a (m x k) · Wᵀ + bias` in f32, m x n row-major. Panics unless the lengths match.
    fn sums(self, a: &[f32], m: usize, (n, k): (usize, usize), bias: Option<&[f32]>) -> Vec<f32> {
        match self {
            Weight::Bf16(w) if m <= bf16_weight::FEW => {
                bf16_weight::matmul_few_rows(a, m, w, (n, k), bias)
            }
            Weight::Bf16(w) => bf16_weight::matmul(a, m, w, (n, k), bias),
            Weight::F32(w) => {
                assert!(a.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
                let mut out = vec![0f32; m * n];
                if m * n * k > 0 {
                    // The weight read as the k x n operand Wᵀ.
                    crate::cpu::gemm_f32((m, n, k), (&mut out, n), (a, 1, k), (w, k, 1), true);
                }
                if let Some(bias) = bias {
                    crate::cpu::add_bias(&mut out, bias);
                }
                out
            }
        }
    }
}

/// `product(rows of x, m)` (m x n f32 sums) as a tensor of x's shape with the last dimension n; x is
/// an f32 CPU tensor whose last dimension is the weight's k.
fn rows_sums(
    x: &Tensor,
    n: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<Tensor> {
    let m = x
        .dims()
        .split_last()
        .map_or(1, |(_, lead)| lead.iter().product());
    let y = crate::cpu::with_slice::<f32, _>(x, |a| product(a, m))?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// A layer whose weight is read where a [`Source`] holds it on every product, its pages kept
/// resident ([`Pages::Keep`]), on the products of [`Weight`]: f32 or bf16 bytes, as the layer's
/// dtype; the bias in f32. Loading copies none of its weight (as diffusers' mapped loading).
struct Mapped {
    source: Source,
    name: String,
    n: usize,
    k: usize,
    /// The layer's dtype: f32 or bf16.
    dtype: DType,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({}, {} x {})", self.name, self.n, self.k)
    }
}

impl Mapped {
    /// `x Wᵀ + b` as f32 sums, with `x` as f32; an error when the source no longer hands out the
    /// weight as it did when the layer was built, or `x` is not what candle's layer of the same
    /// weight takes (a CPU tensor of k columns, in the layer's dtype, or bf16 for an f32 layer).
    fn sums(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, k) = (self.n, self.k);
        let takes = x.dtype() == self.dtype || (self.dtype, x.dtype()) == (DType::F32, DType::BF16);
        if !takes || x.dim(candle_core::D::Minus1)? != k || !x.device().is_cpu() {
            candle_core::bail!(
                "linear {} ({k} -> {n}, {:?}) given {:?} {:?} on {:?}",
                self.name,
                self.dtype,
                x.dtype(),
                x.dims(),
                x.device()
            );
        }
        let xf = to_f32(x)?;
        let mut out = None;
        (self.source)(&self.name, Pages::Keep, &mut |dtype, shape, bytes, _| {
            let w = match dtype {
                DType::F32 => values::<f32>(bytes).map(Weight::F32),
                DType::BF16 => values::<bf16>(bytes).map(Weight::Bf16),
                _ => None,
            };
            if let (Some(w), true) = (w, shape == [n, k]) {
                out = Some(rows_sums(&xf, n, |a, m| {
                    w.sums(a, m, (n, k), self.bias.as_deref())
                }));
            }
        });
        Ok((out.unwrap_or_else(|| Err(changed()))?, xf))
    }
}

/// candle's quantized product of `x` (f32 in, f32 out) plus the bias, in f32; with `x` as f32.
fn quantized_sums(q: &QMatMul, bias: Option<&Tensor>, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let xf = to_f32(x)?.contiguous()?;
    let y = q.forward(&xf)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok((y, xf))
}

/// `x` in f32: a bf16 CPU tensor widened in parallel, others converted by candle.
fn to_f32(x: &Tensor) -> Result<Tensor> {
    match x.device().is_cpu() && x.dtype() == DType::BF16 {
        true => crate::cpu::elementwise::widen(x),
        false => x.to_dtype(DType::F32),
    }
}

/// f32 sums `y` in `dtype`: rounded to bf16 in parallel on the CPU, others converted by candle.
fn from_f32(y: &Tensor, dtype: DType) -> Result<Tensor> {
    match y.device().is_cpu() && y.dtype() == DType::F32 && dtype == DType::BF16 {
        true => crate::cpu::elementwise::round(y),
        false => y.to_dtype(dtype),
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
    packed_forward_vec(x, k, n, kernel, |a, m| {
        let mut out = vec![T::zero(); m * n];
        product(a, m, &mut out);
        out
    })
}

/// A layer on the AMX kernel, through the tanh-GELU with `gelu`: its output written once, without
/// zeroing it first ([`amx::matmul_vec`]).
fn amx_forward(x: &Tensor, p: &Packed<amx::PackedB>, gelu: bool) -> Result<Tensor> {
    let w = p.weight()?;
    let (k, n) = (w.k(), w.n());
    packed_forward_vec(x, k, n, "AMX", |a, m| {
        amx::matmul_vec::<bf16>(a, m, k, w, p.bias.as_deref(), gelu)
    })
}

/// [`packed_forward`] with `product(a, m)` returning the (m x n) output.
fn packed_forward_vec<T: candle_core::WithDType>(
    x: &Tensor,
    k: usize,
    n: usize,
    kernel: &str,
    product: impl FnOnce(&[T], usize) -> Vec<T>,
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
    let out = crate::cpu::with_slice::<T, _>(x, |a| product(a, m))?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::source::{with_source, Visit};
    use crate::nn::test_util::{max_diff, normal};

    /// The GELU folded into the product (f32 on AVX-512, bf16 on AMX or AVX512-BF16) and the
    /// composed path (bf16 elsewhere) equal `gelu_tanh(forward(x))` bit for bit.
    #[test]
    fn forward_gelu_equals_gelu_of_forward() {
        let v = |t: &Tensor| {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        for dtype in [DType::F32, DType::BF16] {
            let to = |t: Tensor| t.to_dtype(dtype).unwrap();
            let plain =
                candle_nn::Linear::new(to(normal((70, 40), 0.3, 1)), Some(to(normal(70, 1.0, 2))));
            let l = Linear::new(plain).unwrap();
            if dtype == DType::F32 && crate::cpu::test_has("avx512") {
                assert!(
                    matches!(l.kernel, Kernel::Avx512(_)),
                    "the fused path is tested"
                );
            }
            let cpu = crate::cpu::features();
            if dtype == DType::BF16 && !cpu.amx && cpu.bf16_dot {
                assert!(
                    matches!(l.kernel, Kernel::Dpbf16(_)),
                    "the fused path is tested"
                );
            }
            if dtype == DType::BF16 && crate::cpu::test_has("amx") {
                assert!(
                    matches!(l.kernel, Kernel::Amx(_)),
                    "the fused path is tested"
                );
            }
            let x = to(normal((2, 9, 40), 1.0, 3));
            let want = super::super::activation::gelu_tanh(&l.forward(&x).unwrap()).unwrap();
            assert_eq!(v(&l.forward_gelu(&x).unwrap()), v(&want), "{dtype:?}");
        }
    }

    /// A 2-d weight's little-endian bytes as a file stores it, in f32 or rounded to bf16.
    fn file_bytes(t: &Tensor, dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F32 => (t.to_vec2::<f32>().unwrap().concat().iter())
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => (t.to_dtype(DType::BF16).unwrap().to_vec2::<bf16>())
                .unwrap()
                .concat()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        }
    }

    /// A bf16 layer against the f32 product of the same bf16 values: one bf16 rounding of the
    /// result (half an ulp), and no further from it than candle's bf16 layer (which rounds the
    /// product, then adds the bias in bf16). `kernel` builds the layer under test.
    fn bf16_layer_rounds_once_and_beats_candles(kernel: impl Fn(&candle_nn::Linear) -> Linear) {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let max = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        for &(m, k, n) in &[(3, 40, 24), (2 * 77, 256, 384)] {
            let w = bf(normal((n, k), 0.1, 1));
            let b = bf(normal(n, 1.0, 2));
            let x = bf(normal((2, m / 2 + 1, k), 1.0, 3));
            let exact = candle_nn::Linear::new(f(&w), Some(f(&b)))
                .forward(&f(&x))
                .unwrap();
            let plain = candle_nn::Linear::new(w, Some(b));
            let got = f(&kernel(&plain).forward(&x).unwrap());
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
                "{m}x{k}x{n}: further off than candle"
            );
        }
    }

    #[test]
    fn amx_linear_rounds_once_and_beats_candles() {
        if crate::cpu::test_has("amx") {
            bf16_layer_rounds_once_and_beats_candles(|l| {
                let fast = Linear::new(l.clone()).unwrap();
                assert!(fast.is_amx());
                fast
            });
        }
    }

    /// The AVX512-BF16 kernel (chosen where there is no AMX; built directly here, so that an AMX
    /// machine tests it too).
    #[test]
    fn dpbf16_linear_rounds_once_and_beats_candles() {
        if crate::cpu::test_has("avx512_bf16") {
            bf16_layer_rounds_once_and_beats_candles(|l| {
                let cpu = crate::cpu::features();
                if cpu.bf16_dot && !cpu.amx {
                    assert!(matches!(
                        Linear::new(l.clone()).unwrap().kernel,
                        Kernel::Dpbf16(_)
                    ));
                }
                let (n, k) = l.weight().dims2().unwrap();
                let w = crate::cpu::with_slice(l.weight(), |w| PackedPairs::from_nk(w, n, k));
                let bias = l
                    .bias()
                    .map(|b| b.to_dtype(DType::F32).unwrap().to_vec1().unwrap());
                Linear::of(Kernel::Dpbf16(Arc::new(Packed::new(w.unwrap(), bias))))
            });
        }
    }

    /// The bf16 panels of the AVX-512 kernel (chosen where there is no AMX; built directly here, so
    /// that an AMX machine tests them too).
    #[test]
    fn avx512_bf16_linear_rounds_once_and_beats_candles() {
        if crate::cpu::test_has("avx512") {
            bf16_layer_rounds_once_and_beats_candles(|l| {
                let (n, k) = l.weight().dims2().unwrap();
                let w = crate::cpu::with_slice(l.weight(), |w| PackedBf16::from_nk(w, n, k));
                let bias = l
                    .bias()
                    .map(|b| b.to_dtype(DType::F32).unwrap().to_vec1().unwrap());
                Linear::of(Kernel::Avx512Bf16(Arc::new(Packed::new(w.unwrap(), bias))))
            });
        }
    }

    /// A bf16 layer on candle's product (CPUs without our bf16 kernels; built directly, so that
    /// every CPU tests it).
    #[test]
    fn widened_bf16_linear_rounds_once_and_beats_candles() {
        bf16_layer_rounds_once_and_beats_candles(|l| Linear::of(Kernel::Candle(l.clone())));
    }

    /// A bf16 input to a layer on candle's product whose weight is f32: the f32 sums of the widened
    /// input rounded once, as for a bf16 weight (not an error from the bf16 weight's kernels).
    #[test]
    fn bf16_input_to_an_f32_weight_takes_the_widened_product() {
        let (w, b) = (normal((24, 40), 0.1, 1), normal(24, 1.0, 2));
        let x = normal((2, 5, 40), 1.0, 3).to_dtype(DType::BF16).unwrap();
        let plain = candle_nn::Linear::new(w, Some(b));
        let got = Linear::of(Kernel::Candle(plain.clone()))
            .forward(&x)
            .unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = plain.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let bits = |t: &Tensor| -> Vec<u16> {
            let t = t.to_dtype(DType::BF16).unwrap().flatten_all().unwrap();
            t.to_vec1::<bf16>()
                .unwrap()
                .into_iter()
                .map(bf16::to_bits)
                .collect()
        };
        assert_eq!(bits(&got), bits(&want));
    }

    /// A run-time LoRA term in a packed layer (added to the f32 accumulators) against the plain
    /// sum `x Wᵀ + b + s (x Aᵀ) Bᵀ`, f32 and bf16 panels.
    #[test]
    fn packed_layer_adds_its_lora_term() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let (w, b) = (normal((24, 40), 0.1, 7), normal(24, 1.0, 8));
        let (down, up) = (normal((3, 40), 0.3, 9), normal((24, 3), 0.3, 10));
        let x = normal((2, 5, 40), 1.0, 11);
        let delta = lora::Delta::new(&[(down.clone(), up.clone(), 0.7)], None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert!(delta.is_packed());
        let want = (candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap()
            + (x.broadcast_matmul(&down.t().unwrap()).unwrap())
                .broadcast_matmul(&(up.t().unwrap() * 0.7).unwrap())
                .unwrap())
        .unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let plain = candle_nn::Linear::new(
                w.to_dtype(dtype).unwrap(),
                Some(b.to_dtype(dtype).unwrap()),
            );
            let ((), slots) = lora::collect(|| {
                let vb = candle_nn::VarBuilder::from_tensors(
                    [
                        ("l.weight".to_string(), plain.weight().clone()),
                        ("l.bias".to_string(), b.to_dtype(dtype).unwrap()),
                    ]
                    .into_iter()
                    .collect(),
                    dtype,
                    &Device::Cpu,
                );
                let l = linear(40, 24, vb.pp("l")).unwrap();
                slots_layer(&l, &delta, &x, dtype, &want);
            });
            assert_eq!(slots.keys().collect::<Vec<_>>(), ["l"]);
        }
    }

    /// A bf16 layer whose f32 sums are formed outside a kernel of ours (candle's product on a CPU
    /// without our bf16 kernels, candle's quantized kernels) adds its run-time LoRA term to those
    /// sums and rounds once: within half an ulp of the exact f32 sum (candle's product), and the
    /// f32 layer's output rounded (quantized, where the activations' own quantization makes the
    /// exact sum no reference); on every CPU.
    #[test]
    fn bf16_layers_add_their_lora_term_before_rounding() {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let max = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        let (m, k, n) = (2 * 77, 256, 384);
        let w = bf(normal((n, k), 0.1, 31));
        let b = bf(normal(n, 1.0, 32));
        let (down, up) = (bf(normal((4, k), 0.3, 33)), bf(normal((n, 4), 0.3, 34)));
        let x = bf(normal((2, m / 2, k), 1.0, 35));
        let delta = lora::Delta::new(&[(down, up, 0.7)], None, &Device::Cpu)
            .unwrap()
            .unwrap();
        let with_lora = |kernel| {
            let l = Linear {
                kernel,
                lora: Some(Arc::new(Slot::default())),
            };
            l.lora.as_ref().unwrap().set(Some(delta.clone()));
            l
        };

        let plain = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let exact = (candle_nn::Linear::new(f(&w), Some(f(&b)))
            .forward(&f(&x))
            .unwrap()
            + delta.forward(&f(&x)).unwrap())
        .unwrap();
        let got = f(&with_lora(Kernel::Candle(plain.clone()))
            .forward(&x)
            .unwrap());
        let err = (got - &exact).unwrap().abs().unwrap();
        let half_ulp = ((exact.abs().unwrap() * 2f64.powi(-8)).unwrap() + 1e-5).unwrap();
        let excess = max((&err - half_ulp).unwrap());
        assert!(
            excess <= 0.0,
            "candle's product: beyond half an ulp by {excess}"
        );
        let twice = f(&(plain.forward(&x).unwrap() + delta.forward(&x).unwrap()).unwrap());
        let twice_err = (twice - &exact).unwrap().abs().unwrap();
        assert!(
            max(err) <= max(twice_err),
            "further off than rounding twice"
        );

        let q = QTensor::quantize(&f(&w), GgmlDType::Q8_0).unwrap();
        let q = with_lora(Kernel::Quantized(
            Arc::new(QMatMul::from_qtensor(q).unwrap()),
            Some(f(&b)),
        ));
        let got = f(&q.forward(&x).unwrap());
        let want = f(&bf(q.forward(&f(&x)).unwrap()));
        assert_eq!(max_diff(&got, &want), 0.0, "quantized: not rounded once");
    }

    fn slots_layer(l: &Linear, delta: &lora::Delta, x: &Tensor, dtype: DType, want: &Tensor) {
        l.lora.as_ref().unwrap().set(Some(delta.clone()));
        let got = l
            .forward(&x.to_dtype(dtype).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let err = max_diff(&got, want);
        let tol = if dtype == DType::F32 { 1e-5 } else { 0.05 };
        assert!(err <= tol, "{dtype:?}: {err}");
    }

    /// A layer built inside [`source::with_source`] packs the source's bytes (the `VarBuilder` holds zeros
    /// here, so the output tells which was read): the same layer as one built from a tensor of
    /// those values, f32 and bf16, and a bf16 layer from f32 bytes (rounded as candle's
    /// conversion rounds). Misaligned bytes or a wrong shape fall back to the `VarBuilder`.
    #[test]
    fn layers_pack_straight_from_the_source_bytes() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let (n, k) = (24, 40);
        let w = normal((n, k), 0.1, 21);
        let b = normal(n, 1.0, 22);
        let x = normal((3, k), 1.0, 23);
        let build = |dtype: DType, source: Option<Source>, weight: &Tensor| {
            let vb = VarBuilder::from_tensors(
                [
                    ("l.weight".to_string(), weight.to_dtype(dtype).unwrap()),
                    ("l.bias".to_string(), b.to_dtype(dtype).unwrap()),
                ]
                .into_iter()
                .collect(),
                dtype,
                &Device::Cpu,
            );
            let l = with_source(source, || linear(k, n, vb.pp("l")).unwrap());
            l.forward(&x.to_dtype(dtype).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let source = |dtype: DType, shift: usize, shape: [usize; 2]| -> Source {
            let mut bytes = vec![0u8; shift];
            bytes.extend(file_bytes(&w, dtype));
            Arc::new(move |name: &str, _: Pages, f: &mut Visit| {
                if name != "l.weight" {
                    return false;
                }
                f(dtype, &shape, &bytes[shift..], &|_| ());
                true
            })
        };
        let zeros = w.zeros_like().unwrap();
        for (run, file) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
        ] {
            let want = build(run, None, &w);
            let from_bytes = build(run, Some(source(file, 0, [n, k])), &zeros);
            assert_eq!(
                max_diff(&from_bytes, &want),
                0.0,
                "{run:?} from {file:?} bytes"
            );
            let fallback = build(run, None, &zeros);
            for (shift, shape) in [(1, [n, k]), (0, [k, n])] {
                let got = build(run, Some(source(file, shift, shape)), &zeros);
                assert_eq!(
                    max_diff(&got, &fallback),
                    0.0,
                    "{run:?}: shift {shift}, {shape:?}"
                );
            }
        }
    }

    /// Without a packing kernel for the layer's dtype (f32 without AVX-512; bf16 without AMX,
    /// AVX512-BF16 or AVX-512), a layer from a source reads the weight where the source holds it
    /// on every product, asking it to keep the pages, and gives the values of the layer built from
    /// the tensor bit for bit (1 and 12 rows, with a bias, input in the layer's dtype and the
    /// other); a source that no longer has the weight gives an error, not a panic.
    #[test]
    fn source_layers_without_a_packing_kernel_read_the_weight_in_place() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Mutex;
        let v = |t: &Tensor| {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let cpu = crate::cpu::features();
        for dtype in [DType::F32, DType::BF16] {
            if (dtype == DType::F32 && cpu.avx512) || (dtype == DType::BF16 && bf16_kernel()) {
                eprintln!("skipped: this CPU packs {dtype:?} layers");
                continue;
            }
            let (n, k) = (70, 600);
            let w = normal((n, k), 0.05, 7).to_dtype(dtype).unwrap();
            let b = normal(n, 1.0, 8).to_dtype(dtype).unwrap();
            let bytes = Arc::new(file_bytes(&w, dtype));
            let pages = Arc::new(Mutex::new(Vec::new()));
            let there = Arc::new(AtomicBool::new(true));
            let (p, t) = (pages.clone(), there.clone());
            let source: Source = Arc::new(move |name: &str, asked: Pages, f: &mut Visit| {
                if name != "l.weight" || !t.load(SeqCst) {
                    return false;
                }
                p.lock().unwrap().push(asked);
                f(dtype, &[n, k], &bytes, &|_| {});
                true
            });
            let tensors = |w: Tensor| {
                let named = [("l.weight", w), ("l.bias", b.clone())];
                VarBuilder::from_tensors(
                    named.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
                    dtype,
                    &Device::Cpu,
                )
            };
            let l = with_source(Some(source), || {
                linear(k, n, tensors(w.zeros_like().unwrap()).pp("l")).unwrap()
            });
            assert!(matches!(l.kernel, Kernel::Mapped(_)), "{dtype:?}");
            let plain = linear(k, n, tensors(w.clone()).pp("l")).unwrap();
            for (rows, x_dtype) in [(1, dtype), (12, dtype), (3, DType::F32), (3, DType::BF16)] {
                let x = normal((rows, k), 1.0, 9).to_dtype(x_dtype).unwrap();
                if plain.forward(&x).is_err() {
                    // (candle's bf16 layer refuses f32 input.)
                    assert!(l.forward(&x).is_err(), "{dtype:?} given {x_dtype:?}");
                    continue;
                }
                let got = l.forward(&x).unwrap();
                assert_eq!(got.dtype(), plain.forward(&x).unwrap().dtype());
                assert_eq!(
                    v(&got),
                    v(&plain.forward(&x).unwrap()),
                    "{dtype:?} {rows} rows"
                );
            }
            let asked = pages.lock().unwrap().clone();
            let products = if dtype == DType::BF16 { 3 } else { 4 };
            assert_eq!(
                asked.len(),
                1 + products,
                "{dtype:?}: built, then one visit a product"
            );
            assert!(asked[0] == Pages::Release && asked[1..].iter().all(|&p| p == Pages::Keep));
            there.store(false, SeqCst);
            let x = normal((2, k), 1.0, 9).to_dtype(dtype).unwrap();
            let err = l.forward(&x).unwrap_err().to_string();
            assert!(err.contains("load the model again"), "{err}");
        }
    }

    /// Packing from a source's f32 bytes (an f32 layer, and a bf16 layer rounding them) hands the
    /// bytes back through `done` in order, every byte once, in more than one part for a weight of
    /// more than 16 MiB, and packs the same layer as from a tensor.
    #[test]
    fn packing_hands_back_the_bytes_as_it_goes() {
        use std::sync::Mutex;
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let (n, k) = (1056, 4100);
        let w = normal((n, k), 0.05, 41);
        let x = normal((2, k), 1.0, 42);
        let bytes = Arc::new(file_bytes(&w, DType::F32));
        for run in [DType::F32, DType::BF16] {
            // (start, len) of each part, as offsets into the bytes.
            let parts = Arc::new(Mutex::new(Vec::new()));
            let (b, p) = (bytes.clone(), parts.clone());
            let source: Source = Arc::new(move |name: &str, _: Pages, f: &mut Visit| {
                if name != "l.weight" {
                    return false;
                }
                let base = b.as_ptr() as usize;
                let done = |part: &[u8]| {
                    let at = part.as_ptr() as usize - base;
                    p.lock().unwrap().push((at, part.len()));
                };
                f(DType::F32, &[n, k], &b, &done);
                true
            });
            let vb = VarBuilder::from_tensors(
                [("l.weight".to_string(), w.to_dtype(run).unwrap())]
                    .into_iter()
                    .collect(),
                run,
                &Device::Cpu,
            );
            let zeros = VarBuilder::zeros(run, &Device::Cpu);
            let from_source = with_source(Some(source), || linear_no_bias(k, n, zeros.pp("l")))
                .unwrap()
                .forward(&x.to_dtype(run).unwrap())
                .unwrap();
            let want = linear_no_bias(k, n, vb.pp("l"))
                .unwrap()
                .forward(&x.to_dtype(run).unwrap())
                .unwrap();
            let diff = max_diff(
                &from_source.to_dtype(DType::F32).unwrap(),
                &want.to_dtype(DType::F32).unwrap(),
            );
            assert_eq!(diff, 0.0, "{run:?}");
            let parts = parts.lock().unwrap().clone();
            assert!(parts.len() > 1, "{run:?}: {parts:?}");
            let mut at = 0;
            for &(start, len) in &parts {
                assert_eq!(start, at, "{run:?}: {parts:?}");
                at += len;
            }
            assert_eq!(at, bytes.len(), "{run:?}: {parts:?}");
        }
    }

    /// A layer built from a source reads the weight's dtype and shape when it is built and packs on
    /// its first product, once. The source here hands out zeros on its first visit and the weight
    /// afterwards, so the output tells which visit was packed; a source that no longer has the
    /// weight at first use gives an error, not a panic.
    #[test]
    fn source_layers_pack_on_first_use_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let (n, k) = (24, 40);
        let w = normal((n, k), 0.1, 31);
        let x = normal((2, k), 1.0, 32);
        let bytes = file_bytes(&w, DType::F32);
        let source = |visits: Arc<AtomicUsize>, last: usize| -> Source {
            let bytes = bytes.clone();
            Arc::new(move |name: &str, _: Pages, f: &mut Visit| {
                let visit = visits.fetch_add(1, SeqCst);
                if name != "l.weight" || visit >= last {
                    return false;
                }
                let zeros = vec![0u8; bytes.len()];
                f(
                    DType::F32,
                    &[n, k],
                    if visit == 0 { &zeros } else { &bytes },
                    &|_| (),
                );
                true
            })
        };
        let vb = VarBuilder::from_tensors(
            [("l.weight".to_string(), w.zeros_like().unwrap())]
                .into_iter()
                .collect(),
            DType::F32,
            &Device::Cpu,
        );
        let visits = Arc::new(AtomicUsize::new(0));
        let l = with_source(Some(source(visits.clone(), usize::MAX)), || {
            linear_no_bias(k, n, vb.pp("l")).unwrap()
        });
        assert_eq!(visits.load(SeqCst), 1, "built");
        let want = candle_nn::Linear::new(w.clone(), None).forward(&x).unwrap();
        let copy = l.clone();
        for layer in [&l, &l, &copy] {
            let diff = max_diff(&layer.forward(&x).unwrap(), &want);
            assert!(diff <= 2e-6, "not the weight of the second visit: {diff}");
        }
        assert_eq!(visits.load(SeqCst), 2, "packed once, by the first product");
        let gone = with_source(Some(source(Arc::new(AtomicUsize::new(0)), 1)), || {
            linear_no_bias(k, n, vb.pp("l")).unwrap()
        });
        let err = gone.forward(&x).unwrap_err().to_string();
        assert!(err.contains("load the model again"), "{err}");
    }

    /// Layers built inside [`read_in_place`] read the source's bytes on each of their first
    /// products and pack on the next: the packed layer's outputs to the bit (plain, through the
    /// GELU, with a LoRA term, in place and packed), one visit of the source per product in place
    /// and one for the packing, for f32 layers and for bf16 layers on the f32 kernel's panels (from
    /// bf16 bytes, and from f32 bytes rounded); a source that no longer has the weight gives an
    /// error, in place or packing. bf16 layers on AMX or AVX512-BF16 pack on their first product.
    #[test]
    fn in_place_layers_equal_packed_layers() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        if !crate::cpu::test_has("avx512") {
            return;
        }
        // Past a block of k and a partial last panel.
        let (n, k) = (70, 2100);
        let (w, b) = (normal((n, k), 0.03, 51), normal(n, 1.0, 52));
        let bits = |t: Tensor| {
            let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        let visits = Arc::new(AtomicUsize::new(0));
        let source = |file: DType, last: usize| -> Source {
            let (bytes, visits) = (file_bytes(&w, file), visits.clone());
            Arc::new(move |name: &str, _: Pages, f: &mut Visit| {
                let visit = visits.fetch_add(1, SeqCst);
                if name != "l.weight" || visit >= last {
                    return false;
                }
                f(file, &[n, k], &bytes, &|_| ());
                true
            })
        };
        let build = |run: DType, source: Source, in_place: bool| {
            let vb = VarBuilder::from_tensors(
                [
                    (
                        "l.weight".to_string(),
                        w.zeros_like().unwrap().to_dtype(run).unwrap(),
                    ),
                    ("l.bias".to_string(), b.to_dtype(run).unwrap()),
                ]
                .into_iter()
                .collect(),
                run,
                &Device::Cpu,
            );
            let make = || with_source(Some(source), || linear(k, n, vb.pp("l")).unwrap());
            let (l, slots) = match in_place {
                true => read_in_place(|| lora::collect(make)),
                false => lora::collect(make),
            };
            assert_eq!(slots.keys().collect::<Vec<_>>(), ["l"]);
            l
        };
        let cpu = crate::cpu::features();
        for (run, file) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
        ] {
            let case = format!("{run:?} from {file:?}");
            let x = normal((3, 5, k), 1.0, 53).to_dtype(run).unwrap();
            let packed = build(run, source(file, usize::MAX), false);
            let before = visits.load(SeqCst);
            let in_place = build(run, source(file, usize::MAX), true);
            assert_eq!(
                visits.load(SeqCst),
                before + 1,
                "{case}: built on the dtype and shape"
            );
            let panels = run == DType::F32 || !(cpu.amx || cpu.bf16_dot);
            assert_eq!(
                matches!(in_place.kernel, Kernel::Avx512InPlace(_)),
                panels,
                "{case}"
            );
            let before = visits.load(SeqCst);
            assert_eq!(
                bits(in_place.forward(&x).unwrap()),
                bits(packed.forward(&x).unwrap()),
                "{case}"
            );
            assert_eq!(
                bits(in_place.forward_gelu(&x).unwrap()),
                bits(packed.forward_gelu(&x).unwrap()),
                "{case}: GELU"
            );
            // The in-place layer's two products (when in place) and the packing of each layer on
            // its first.
            let want = if panels { 3 } else { 2 };
            assert_eq!(
                visits.load(SeqCst),
                before + want,
                "{case}: a visit per product"
            );
            let (down, up) = (normal((3, k), 0.3, 54), normal((n, 3), 0.3, 55));
            let delta = lora::Delta::new(&[(down, up, 0.7)], None, &Device::Cpu)
                .unwrap()
                .unwrap();
            for l in [&packed, &in_place] {
                l.lora.as_ref().unwrap().set(Some(delta.clone()));
            }
            // The third product packs (one more visit), the fourth runs on the panels.
            let before = visits.load(SeqCst);
            for product in [3, 4] {
                assert_eq!(
                    bits(in_place.forward(&x).unwrap()),
                    bits(packed.forward(&x).unwrap()),
                    "{case}: LoRA, product {product}"
                );
            }
            assert_eq!(
                visits.load(SeqCst),
                before + usize::from(panels),
                "{case}: packed once"
            );
            // A source without the weight at the first product, and (in place) at the packing.
            for runs in [0, IN_PLACE_RUNS] {
                let gone = build(run, source(file, visits.load(SeqCst) + 1 + runs), true);
                for _ in 0..runs {
                    gone.forward(&x).unwrap();
                }
                match gone.forward(&x) {
                    Err(e) => assert!(e.to_string().contains("load the model again"), "{e}"),
                    Ok(_) => panic!("{case}: a product without its weight"),
                }
                if !panels {
                    break;
                }
            }
        }
    }

    /// Quantized layers against the f32 product, relative RMS error by type (the activations are
    /// quantized to 8 bits too); a width that is not whole blocks stays unquantized.
    #[test]
    fn quantized_layers_are_close_to_f32() {
        let (w, b) = (normal((48, 512), 0.05, 12), normal(48, 1.0, 13));
        let x = normal((2, 7, 512), 1.0, 14);
        let plain = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let want = plain.forward(&x).unwrap();
        let rms = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (dtype, tol) in [
            (GgmlDType::Q8_0, 0.01),
            (GgmlDType::Q6K, 0.03),
            (GgmlDType::Q4K, 0.1),
            (GgmlDType::Q4_0, 0.15),
        ] {
            let q = Linear::quantized(plain.clone(), dtype).unwrap();
            assert!(q.is_quantized(), "{dtype:?}");
            assert_eq!(q.is_vnni(), crate::cpu::qgemm::available());
            let got = q.forward(&x).unwrap();
            let err = rms(&(got - &want).unwrap()) / rms(&want);
            assert!(err < tol, "{dtype:?}: relative RMS error {err}");
        }
        // 40 inputs: not a whole number of Q8_0's 32-value blocks.
        let narrow = candle_nn::Linear::new(normal((8, 40), 0.1, 15), None);
        assert!(!Linear::quantized(narrow, GgmlDType::Q8_0)
            .unwrap()
            .is_quantized());
    }

    /// The AVX-512 f32 layer against candle's f32 layer: the same sums in another order.
    #[test]
    fn avx512_linear_equals_candles() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n, bias) in &[(3, 40, 24, true), (2 * 77, 300, 70, false)] {
            let w = normal((n, k), 0.1, 4);
            let b = bias.then(|| normal(n, 1.0, 5));
            let x = normal((2, m / 2 + 1, k), 1.0, 6);
            let plain = candle_nn::Linear::new(w, b);
            let fast = Linear::new(plain.clone()).unwrap();
            assert!(fast.is_avx512());
            let diff = max_diff(&fast.forward(&x).unwrap(), &plain.forward(&x).unwrap());
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
