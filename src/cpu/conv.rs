//! 2-D convolution (stride 1, square kernel, zero padding) on the CPU, for the VAE: f32; or, for bf16
//! runs, with bf16 operands (the input rounded to bf16 as it is copied, bf16 weights) summed in f32
//! on the AMX tiles ([`amx::matmul_taps`], c_in a multiple of 32) or AVX512-BF16
//! ([`dpbf16::matmul_taps`]) where the CPU has them, and with bf16 weights (stored as bf16 panels,
//! widened in the f32 kernel; the input stays f32) where it does not.
//!
//! candle's CPU convolution copies the input into an im2col matrix (k² times the input: 1.2 GB for
//! a 3x3 convolution over 128 channels at 512²) and multiplies that. Here the image is copied, one
//! band of rows at a time, into a zero-padded channels-last layout, and the output is the sum over
//! the k² kernel taps of products of that band, read from shifted starts, with the tap's
//! (c_in x c_out) weights ([`sgemm::matmul_taps`]). Output rows run over the padded width, so the
//! padding columns of each row are computed and dropped when the result is written back
//! channels-first. Beyond the input and output, a call holds about 64 MiB.
//!
//! Images kept channels-last between layers ([`PackedConv2d::forward_channels_last`]) skip both
//! layout changes: the band is a copy of whole rows and the result a copy without the padding.
//!
//! Where AVX-512 is missing (AVX2 CPUs, other architectures) the same band is multiplied by the
//! `gemm` crate (candle's own matrix product), one product per row of the kernel: for a kernel row
//! dy the k taps' inputs of an output pixel are k neighbouring pixels, k x c_in values side by
//! side in the band, so the band read from a shifted start at a stride of one pixel is the left
//! operand, without a copy ([`Taps::Gemm`]).

use super::amx;
use super::dpbf16::{self, PackedPairs};
use super::group_norm::ChannelAffine;
use super::sgemm::{self, PackedBf16, PackedF32, PanelElem};
use super::OutPtr;
use rayon::prelude::*;

/// Channels x pixels per tile of the scalar channels-last copy (bf16 operands).
const TILE: usize = 16;

/// A convolution's weights packed per tap.
#[derive(Debug, Clone)]
pub struct PackedConv2d {
    cin: usize,
    cout: usize,
    ksize: usize,
    pad: usize,
    taps: Taps,
    bias: Option<Vec<f32>>,
}

/// The taps' weights, in the operand type of their kernel.
#[derive(Debug, Clone)]
enum Taps {
    F32(Vec<PackedF32>),
    Bf16Weights(Vec<PackedBf16>),
    Bf16(Vec<PackedPairs>),
    /// The same operands on the AMX tiles, where the CPU has them and c_in is a multiple of 32
    /// (each tap's rows of the band are then a tile operand as they lie).
    Amx(Vec<amx::PackedB>),
    /// f32 for the `gemm` crate: per kernel row dy, a (k c_in) x c_out row-major matrix whose row
    /// dx c_in + i holds the weights of input channel i at tap (dy, dx).
    Gemm(Vec<Vec<f32>>),
}

/// The element types of a weight [`PackedConv2d::new`] takes: those that widen to f32 exactly.
pub trait Weight: Copy + Sync + Into<f32> {}
impl Weight for f32 {}
impl Weight for half::bf16 {}
impl Weight for half::f16 {}

/// The operands of a packed convolution's products (sums are f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operands {
    F32,
    /// Weights rounded to bf16 (to nearest even) and held so, half the memory of f32; the input f32.
    Bf16Weights,
    /// Input and weights rounded to bf16 (to nearest even), as a bf16 convolution takes them.
    Bf16,
}

impl PackedConv2d {
    /// From PyTorch's weight layout (c_out, c_in, k, k), f32 or values that widen to f32 exactly
    /// (bf16, f16: a weight file's bytes), and an optional bias (c_out). Where AVX-512 is missing
    /// ([`sgemm::available`]) the `gemm` crate's f32 kernel whatever the operands
    /// ([`Self::on_gemm`]). Bf16 operands run on the AMX tiles where c_in is a multiple of 32, else
    /// on AVX512-BF16, else (AMX with AVX512-BF16 switched off) as bf16 weights. Panics if the
    /// lengths do not match.
    pub fn new<W: Weight>(
        weight: &[W],
        bias: Option<Vec<f32>>,
        dims: (usize, usize, usize, usize),
        operands: Operands,
    ) -> Self {
        if !sgemm::available() {
            return Self::on_gemm(weight, bias, dims);
        }
        let (cout, cin, ksize, pad) = dims;
        Self::check(weight, bias.as_deref(), dims);
        let kk = ksize * ksize;
        // Bf16 operands: on the tiles where c_in fits them, else on AVX512-BF16, else (AMX with
        // AVX512-BF16 switched off) as bf16 weights.
        let on_amx = amx::available() && cin.is_multiple_of(32);
        let operands = match operands {
            Operands::Bf16 if !on_amx && !dpbf16::available() => Operands::Bf16Weights,
            operands => operands,
        };
        let taps = match operands {
            Operands::F32 => Taps::F32(
                split_taps(weight, kk, W::into)
                    .iter()
                    .map(|w| PackedF32::from_nk(w, cout, cin))
                    .collect(),
            ),
            Operands::Bf16Weights => Taps::Bf16Weights(
                split_taps(weight, kk, |w| super::round_bf16(w.into()))
                    .iter()
                    .map(|w| PackedBf16::from_nk(w, cout, cin))
                    .collect(),
            ),
            Operands::Bf16 if on_amx => Taps::Amx(
                split_taps(weight, kk, |w| super::round_bf16(w.into()))
                    .iter()
                    .map(|w| amx::PackedB::from_nk(w, cout, cin))
                    .collect(),
            ),
            Operands::Bf16 => Taps::Bf16(
                split_taps(weight, kk, |w| super::round_bf16(w.into()))
                    .iter()
                    .map(|w| PackedPairs::from_nk(w, cout, cin))
                    .collect(),
            ),
        };
        Self {
            cin,
            cout,
            ksize,
            pad,
            taps,
            bias,
        }
    }

    /// [`Self::new`] on the `gemm` crate's f32 kernel, on any CPU: the weights kept f32.
    pub fn on_gemm<W: Weight>(
        weight: &[W],
        bias: Option<Vec<f32>>,
        dims: (usize, usize, usize, usize),
    ) -> Self {
        let (cout, cin, ksize, pad) = dims;
        Self::check(weight, bias.as_deref(), dims);
        // Row dy: [dx cin + i][o] = weight[o][i][dy][dx], on the rayon pool in blocks of 64 rows
        // by 16 outputs, whose reads (16 runs of 64 inputs, k² apart) stay in cache: one row at a
        // time read one value per line, c_in k² values apart (0.4 s for a VAE decoder).
        const ROWS: usize = 64;
        const OUTS: usize = 16;
        let row = |dy: usize| {
            let mut m = vec![0f32; ksize * cin * cout];
            let cols = cout.max(1);
            m.par_chunks_mut(ROWS * cols)
                .enumerate()
                .for_each(|(b, block)| {
                    for o0 in (0..cout).step_by(OUTS) {
                        for (rr, dst) in block.chunks_exact_mut(cols).enumerate() {
                            let (dx, i) = ((b * ROWS + rr) / cin, (b * ROWS + rr) % cin);
                            for (o, d) in dst.iter_mut().enumerate().skip(o0).take(OUTS) {
                                *d = weight[((o * cin + i) * ksize + dy) * ksize + dx].into();
                            }
                        }
                    }
                });
            m
        };
        Self {
            cin,
            cout,
            ksize,
            pad,
            taps: Taps::Gemm((0..ksize).map(row).collect()),
            bias,
        }
    }

    /// Panics unless weight holds (c_out, c_in, k, k) values and bias (if any) c_out.
    fn check<W>(
        weight: &[W],
        bias: Option<&[f32]>,
        (cout, cin, ksize, _): (usize, usize, usize, usize),
    ) {
        assert_eq!(weight.len(), cout * cin * ksize * ksize, "weight length");
        if let Some(b) = bias {
            assert_eq!(b.len(), cout, "bias length");
        }
    }

    pub fn cin(&self) -> usize {
        self.cin
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    /// (height, width) of the output for an input of (h, w); None if the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (hp, wp) = (h + 2 * self.pad, w + 2 * self.pad);
        (hp >= self.ksize && wp >= self.ksize).then(|| (hp - self.ksize + 1, wp - self.ksize + 1))
    }

    /// The operands its products take.
    pub fn operands(&self) -> Operands {
        match self.taps {
            Taps::F32(_) | Taps::Gemm(_) => Operands::F32,
            Taps::Bf16Weights(_) => Operands::Bf16Weights,
            Taps::Bf16(_) | Taps::Amx(_) => Operands::Bf16,
        }
    }

    /// x: (b, c_in, h, w) row-major -> (b, c_out, h', w'). Panics on a length mismatch or a kernel
    /// larger than the padded image (callers check [`Self::output_size`]).
    pub fn forward(&self, x: &[f32], b: usize, h: usize, w: usize) -> Vec<f32> {
        self.forward_in(x, b, (h, w), Input::First)
    }

    /// [`Self::forward`] with images channels-last: x (b, h, w, c_in) -> (b, h', w', c_out).
    pub fn forward_channels_last(&self, x: &[f32], b: usize, h: usize, w: usize) -> Vec<f32> {
        self.forward_in(x, b, (h, w), Input::Last)
    }

    /// [`Self::forward_channels_last`] of `norm` applied to x (a GroupNorm and SiLU): applied to
    /// each row as it is copied into the band, so the normalised image is never written whole.
    /// Panics if `norm` is not of (b, c_in).
    pub fn forward_channels_last_after(
        &self,
        x: &[f32],
        (b, h, w): (usize, usize, usize),
        norm: &ChannelAffine,
    ) -> Vec<f32> {
        assert_eq!(norm.dims(), (b, self.cin), "normalisation's dims");
        self.forward_in(x, b, (h, w), Input::LastAfter(norm))
    }

    fn forward_in(&self, x: &[f32], b: usize, (h, w): (usize, usize), input: Input) -> Vec<f32> {
        let bias = self.bias.as_deref();
        match &self.taps {
            Taps::F32(taps) => self.forward_f32(x, b, (h, w), input, taps),
            Taps::Bf16Weights(taps) => self.forward_f32(x, b, (h, w), input, taps),
            Taps::Gemm(rows) => self.forward_gemm(x, b, (h, w), input, rows),
            Taps::Bf16(_) | Taps::Amx(_) => {
                let (cin, round) = (self.cin, super::round_bf16);
                self.forward_with(
                    x,
                    b,
                    (h, w),
                    input,
                    |x, i, y, row| match input {
                        Input::First => fill_row(x, (cin, h, w), y, row, round),
                        Input::Last => copy_row(&x[y * w * cin..][..w * cin], row, round),
                        Input::LastAfter(norm) => {
                            let mut normed = vec![0f32; w * cin];
                            norm.apply(i, &x[y * w * cin..][..w * cin], &mut normed);
                            copy_row(&normed, row, round)
                        }
                    },
                    |img, offsets, m, prod| match &self.taps {
                        Taps::Amx(taps) => {
                            amx::matmul_taps(img, offsets, m, taps, bias, prod, self.cout)
                        }
                        Taps::Bf16(taps) => dpbf16::matmul_taps(
                            img, offsets, m, self.cin, taps, bias, prod, self.cout,
                        ),
                        Taps::F32(_) | Taps::Bf16Weights(_) | Taps::Gemm(_) => {
                            unreachable!("bf16 operands are packed as Bf16 or Amx")
                        }
                    },
                )
            }
        }
    }

    /// [`Self::forward_in`] on the f32 kernel, whose panels hold f32 or bf16.
    fn forward_f32<E: PanelElem>(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        input: Input,
        taps: &[sgemm::Packed<E>],
    ) -> Vec<f32> {
        let bias = self.bias.as_deref();
        assert!(sgemm::available(), "convolution kernels need AVX-512");
        self.forward_f32_with(x, b, (h, w), input, |img, offsets, m, prod| {
            sgemm::matmul_taps(img, offsets, m, self.cin, taps, bias, prod, self.cout)
        })
    }

    /// [`Self::forward_in`] of f32 bands with the taps' sum `product(band, offsets, rows, out)`
    /// ([`Self::forward_with`]); a 1x1 convolution of channels-last images is one product over all
    /// their pixels, without a band.
    fn forward_f32_with(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        input: Input,
        product: impl Fn(&[f32], &[usize], usize, &mut [f32]),
    ) -> Vec<f32> {
        let cin = self.cin;
        if matches!(input, Input::Last) && self.ksize == 1 && self.pad == 0 {
            assert_eq!(x.len(), b * h * w * cin, "input length");
            let mut out = vec![0f32; b * h * w * self.cout];
            if !out.is_empty() {
                product(x, &[0], b * h * w, &mut out);
            }
            return out;
        }
        let avx512 = sgemm::available();
        self.forward_with(
            x,
            b,
            (h, w),
            input,
            |x, i, y, row: &mut [f32]| {
                let src = || &x[y * w * cin..][..w * cin];
                match input {
                    Input::Last => return row.copy_from_slice(src()),
                    Input::LastAfter(norm) => return norm.apply(i, src(), row),
                    Input::First if !avx512 => return fill_row(x, (cin, h, w), y, row, |v| v),
                    Input::First => {}
                }
                assert!(x.len() >= cin * h * w && row.len() >= w * cin && y < h);
                // SAFETY: AVX-512 is available (checked above); channel c's row y is w values at
                // c h w + y w of x, pixel xx's channels cin values at xx cin of row (asserted
                // lengths).
                unsafe {
                    super::transpose::transpose(
                        x[y * w..].as_ptr(),
                        h * w,
                        (cin, w),
                        row.as_mut_ptr(),
                        cin,
                        cin,
                    )
                }
            },
            product,
        )
    }

    /// [`Self::forward_in`] on the `gemm` crate: per kernel row, the band read from that row's
    /// first tap at a stride of one pixel (k c_in values per output pixel) times the row's
    /// weights, added up in the output, which starts as the bias.
    fn forward_gemm(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        input: Input,
        rows: &[Vec<f32>],
    ) -> Vec<f32> {
        let (cin, cout, k) = (self.cin, self.cout, self.ksize);
        let product = |img: &[f32], offsets: &[usize], m: usize, prod: &mut [f32]| {
            assert!(prod.len() >= m * cout && rows.len() == k);
            match &self.bias {
                Some(bias) => prod[..m * cout]
                    .par_chunks_mut(cout.max(1))
                    .for_each(|r| r.copy_from_slice(bias)),
                None => prod[..m * cout].fill(0.0),
            }
            for (dy, weights) in rows.iter().enumerate() {
                let start = offsets.get(dy * k).copied().unwrap_or(0);
                // Output pixel r reads k cin values from start + r cin.
                assert!(m == 0 || start + (m - 1) * cin + k * cin <= img.len());
                assert_eq!(weights.len(), k * cin * cout);
                // SAFETY: the left operand, m x (k cin) at row stride cin and column stride 1,
                // lies inside img (asserted; rows overlap, which a read-only operand allows); the
                // right, (k cin) x cout row-major, is `weights` (asserted); the output m x cout
                // row-major lies in prod (asserted), which nothing else touches meanwhile.
                unsafe {
                    gemm::gemm(
                        m,
                        cout,
                        k * cin,
                        prod.as_mut_ptr(),
                        1,
                        cout as isize,
                        true,
                        img.as_ptr().add(start),
                        1,
                        cin as isize,
                        weights.as_ptr(),
                        1,
                        cout as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism(m * cout * k * cin),
                    )
                }
            }
        };
        self.forward_f32_with(x, b, (h, w), input, product)
    }

    /// [`Self::forward_in`] with the band copied as `T` (`fill(image, i, y, row)` writes input
    /// row y of image i channels-last into the w x cin values of `row`) and the taps' sum
    /// `product(band, offsets, rows, out)`; the output channels-last unless the input is
    /// channels-first.
    fn forward_with<T: Copy + Default + Send + Sync>(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        input: Input,
        fill: impl Fn(&[f32], usize, usize, &mut [T]) + Sync,
        product: impl Fn(&[T], &[usize], usize, &mut [f32]),
    ) -> Vec<f32> {
        let last = !matches!(input, Input::First);
        let (cin, cout, k, p) = (self.cin, self.cout, self.ksize, self.pad);
        assert_eq!(x.len(), b * cin * h * w, "input length");
        let avx512 = sgemm::available();
        let (ho, wo) = self
            .output_size(h, w)
            .expect("kernel larger than the image");
        let wp = w + 2 * p;
        let mut out = vec![0f32; b * cout * ho * wo];
        if out.is_empty() {
            return out;
        }
        // Output rows are computed in bands, so that the channels-last copy and the product
        // hold a band each (about BAND floats) rather than the whole image.
        // (Small in unit tests, so that they cover several bands.)
        const BAND: usize = if cfg!(test) { 1 << 14 } else { 8 << 20 };
        let band = (BAND / (wp * cin.max(cout))).clamp(1, ho);
        // A band of `rows` output rows reads rows + k - 1 padded rows, and the last tap k - 1
        // elements past them (garbage columns, dropped); the AMX product reads its rows in
        // blocks of 32, so up to 31 pixels further (feeding only output rows it drops).
        let mut img = vec![T::default(); ((band + k - 1) * wp + k + 32) * cin];
        let mut prod = vec![0f32; band * wp * cout];
        let offsets: Vec<usize> = (0..k * k).map(|t| (t / k * wp + t % k) * cin).collect();
        let plane = ho * wo;
        for (image, (x, out)) in x
            .chunks(cin * h * w)
            .zip(out.chunks_mut(cout * plane))
            .enumerate()
        {
            for y0 in (0..ho).step_by(band) {
                let rows = band.min(ho - y0);
                // Padded rows y0 .. y0 + rows + k - 1, channels-last.
                img.par_chunks_mut(wp * cin)
                    .take(rows + k - 1)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let yp = y0 + i;
                        if yp < p || yp >= h + p {
                            row.fill(T::default());
                            return;
                        }
                        let y = yp - p;
                        // The padding columns; `fill` writes every other value.
                        row[..p * cin].fill(T::default());
                        row[(w + p) * cin..].fill(T::default());
                        fill(x, image, y, &mut row[p * cin..(w + p) * cin]);
                    });
                let m = rows * wp;
                product(&img, &offsets, m, &mut prod[..m * cout]);
                if last {
                    // Rows y0 .. y0 + rows, dropping the padding columns.
                    out[y0 * wo * cout..(y0 + rows) * wo * cout]
                        .par_chunks_mut(wo * cout)
                        .zip(prod[..m * cout].par_chunks(wp * cout))
                        .for_each(|(o, row)| o.copy_from_slice(&row[..wo * cout]));
                    continue;
                }
                // Back to channels-first, dropping the padding columns.
                let optr = OutPtr(out.as_mut_ptr());
                prod[..m * cout]
                    .par_chunks(wp * cout)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let y = y0 + i;
                        assert!(row.len() >= wo * cout && y < ho);
                        let at = optr.get().wrapping_add(y * wo);
                        if avx512 {
                            // SAFETY: AVX-512 is available (checked above); row holds wo pixels
                            // of cout channels (asserted); channel o's pixels 0 .. wo of row y
                            // are out's o plane + y wo .. + wo (o < cout, y < ho), which only
                            // this task writes.
                            unsafe {
                                super::transpose::transpose(
                                    row.as_ptr(),
                                    cout,
                                    (wo, cout),
                                    at,
                                    plane,
                                    wo,
                                )
                            }
                        } else {
                            // SAFETY: as above, without the AVX-512 condition.
                            unsafe { spill_row(&row[..wo * cout], (wo, cout), at, plane) }
                        }
                    });
            }
        }
        out
    }
}

/// How a convolution's input is laid out, and what is applied to it on its way into the band.
#[derive(Clone, Copy)]
enum Input<'a> {
    First,
    Last,
    LastAfter(&'a ChannelAffine),
}

/// A channels-last input row into `row`, each value through `to`.
fn copy_row<T>(x: &[f32], row: &mut [T], to: impl Fn(f32) -> T) {
    for (r, &v) in row.iter_mut().zip(x) {
        *r = to(v);
    }
}

/// Input row y of one image (cin x h x w) channels-last into `row` (w x cin), each value through
/// `to`: in tiles of 16 channels x 16 pixels, the 16 input rows read staying in L1 while each
/// pixel's channels are written side by side.
fn fill_row<T: Copy>(
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    y: usize,
    row: &mut [T],
    to: impl Fn(f32) -> T,
) {
    for c0 in (0..cin).step_by(TILE) {
        let cn = TILE.min(cin - c0);
        for x0 in (0..w).step_by(TILE) {
            for xx in x0..(x0 + TILE).min(w) {
                let dst = &mut row[xx * cin + c0..][..cn];
                for (ci, d) in dst.iter_mut().enumerate() {
                    *d = to(x[((c0 + ci) * h + y) * w + xx]);
                }
            }
        }
    }
}

/// One output row channels-last (`row`: wo pixels x cout) into channels-first planes: channel o's
/// pixel xx to `at + o plane + xx`, in tiles of 16 pixels x 16 channels ([`fill_row`]'s reverse).
///
/// # Safety
/// `at + o plane + xx` must be valid for writes for o < cout, xx < wo, and no other thread may
/// touch those places during the call.
unsafe fn spill_row(row: &[f32], (wo, cout): (usize, usize), at: *mut f32, plane: usize) {
    assert!(row.len() >= wo * cout);
    for x0 in (0..wo).step_by(TILE) {
        for o0 in (0..cout).step_by(TILE) {
            for o in o0..(o0 + TILE).min(cout) {
                for xx in x0..(x0 + TILE).min(wo) {
                    // SAFETY: o < cout and xx < wo: inside what the caller vouches for.
                    unsafe { at.add(o * plane + xx).write(row[xx * cout + o]) };
                }
            }
        }
    }
}

/// The `gemm` crate's threading for a product of `work` multiply-adds: the rayon pool's threads,
/// but one below a million (the pool's hand-off would cost more than it saves).
fn parallelism(work: usize) -> gemm::Parallelism {
    match rayon::current_num_threads() {
        n if n > 1 && work >= 1 << 20 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    }
}

/// The `kk` taps' (c_out x c_in) weight matrices of a (c_out, c_in, k, k) weight, each value put
/// through `cast`: tap t's value (o, i) is `weight[(o c_in + i) kk + t]`. One sequential pass over
/// the weight on the rayon pool, writing the taps side by side (a strided pass per tap read every
/// cache line k² times).
fn split_taps<W: Weight, T: Copy + Default + Send>(
    weight: &[W],
    kk: usize,
    cast: impl Fn(W) -> T + Sync,
) -> Vec<Vec<T>> {
    const BLOCK: usize = 4096;
    let n = weight.len() / kk.max(1);
    let mut taps: Vec<Vec<T>> = (0..kk).map(|_| vec![T::default(); n]).collect();
    // Block b of every tap, side by side.
    let mut blocks: Vec<Vec<&mut [T]>> = (0..n.div_ceil(BLOCK)).map(|_| Vec::new()).collect();
    for tap in &mut taps {
        for (block, part) in blocks.iter_mut().zip(tap.chunks_mut(BLOCK)) {
            block.push(part);
        }
    }
    blocks
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut outs)| {
            let src = &weight[b * BLOCK * kk..];
            for j in 0..outs.first().map_or(0, |o| o.len()) {
                for (t, out) in outs.iter_mut().enumerate() {
                    out[j] = cast(src[j * kk + t]);
                }
            }
        });
    taps
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// Against candle's conv2d (im2col) on odd sizes, 3x3 with padding 1 and 1x1 without, batch 2:
    /// on the `gemm` crate (any CPU); with AVX-512, f32, and bf16 weights against candle's
    /// convolution with the weights rounded to bf16 (the input f32).
    #[test]
    fn conv_equals_candles() {
        conv_equals_candles_with(None);
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for operands in [Operands::F32, Operands::Bf16Weights] {
            conv_equals_candles_with(Some(operands));
        }
    }

    /// Packed for `operands`, or on the `gemm` crate with None.
    fn conv_equals_candles_with(kernel: Option<Operands>) {
        let operands = kernel.unwrap_or(Operands::F32);
        for &(b, cin, cout, h, w, k, p) in &[
            (2, 5, 7, 9, 13, 3, 1),
            (1, 40, 33, 17, 6, 3, 1),
            (2, 12, 20, 5, 4, 1, 0),
            (1, 3, 4, 4, 3, 3, 0),
            (1, 64, 8, 30, 22, 3, 1),
        ] {
            let x = crate::cpu::normal_tensor((b, cin, h, w), 1.0, 1);
            let wt = crate::cpu::normal_tensor((cout, cin, k, k), 0.2, 2);
            let bias = crate::cpu::normal_tensor(cout, 1.0, 3);
            let rounded = match operands {
                Operands::F32 => wt.clone(),
                _ => wt
                    .to_dtype(candle_core::DType::BF16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap(),
            };
            let want = x
                .conv2d(&rounded, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let (wv, bv) = (
                wt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                bias.to_vec1().ok(),
            );
            let conv = match kernel {
                Some(operands) => PackedConv2d::new(&wv, bv, (cout, cin, k, p), operands),
                None => PackedConv2d::on_gemm(&wv, bv, (cout, cin, k, p)),
            };
            assert_eq!(conv.operands(), operands);
            both_layouts_equal(&conv, &x, &want, 1e-5);
        }
    }

    /// `conv` on x (b, c, h, w) channels-first and channels-last, each against `want` (b, c', h',
    /// w') within `tol` (relative to 1 + |want|).
    fn both_layouts_equal(conv: &PackedConv2d, x: &Tensor, want: &Tensor, tol: f32) {
        let (b, _, h, w) = x.dims4().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let last = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap();
        for channels_last in [false, true] {
            let (got, want) = match channels_last {
                false => (conv.forward(&flat(x), b, h, w), flat(want)),
                true => {
                    let got = conv.forward_channels_last(&flat(&last(x)), b, h, w);
                    (got, flat(&last(want)))
                }
            };
            assert_eq!(got.len(), want.len());
            for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                let ok = (g - v).abs() <= tol * (1.0 + v.abs());
                assert!(ok, "channels-last {channels_last}, {i}: {g} vs {v}");
            }
        }
    }

    /// A GroupNorm and SiLU applied as the band is copied: the same values as the normalised image
    /// written out and convolved, for each operand type the CPU runs (batch 2, odd sizes, several
    /// bands).
    #[test]
    fn normalised_on_the_way_in_equals_normalised_first() {
        // (None: the `gemm` crate's kernel, on any CPU.)
        let mut kinds = vec![None];
        if crate::cpu::test_has("avx512") {
            kinds.extend([Some(Operands::F32), Some(Operands::Bf16Weights)]);
        }
        if crate::cpu::test_has("avx512_bf16") {
            kinds.push(Some(Operands::Bf16));
        }
        let (b, cin, cout, h, w, groups) = (2, 40, 24, 19, 27, 8);
        let x = crate::cpu::lcg_uniform(b * h * w * cin, &mut 7, -2.0, 3.0);
        let gamma = crate::cpu::lcg_uniform(cin, &mut 8, 0.5, 1.5);
        let beta = crate::cpu::lcg_uniform(cin, &mut 9, -0.5, 0.5);
        let wt = crate::cpu::lcg_uniform(cout * cin * 9, &mut 10, -0.1, 0.1);
        for silu in [false, true] {
            let gn = |x: &[f32]| {
                let g = super::super::group_norm::channels_last_affine;
                g(x, b, h * w, cin, groups, &gamma, &beta, 1e-6, silu)
            };
            let normed = gn(&x).apply_all(&x);
            for &kernel in &kinds {
                let conv = match kernel {
                    Some(operands) => PackedConv2d::new(&wt, None, (cout, cin, 3, 1), operands),
                    None => PackedConv2d::on_gemm(&wt, None, (cout, cin, 3, 1)),
                };
                let want = conv.forward_channels_last(&normed, b, h, w);
                let got = conv.forward_channels_last_after(&x, (b, h, w), &gn(&x));
                assert!(got == want, "{kernel:?}, silu {silu}");
            }
        }
    }

    /// bf16 operands: candle's f32 convolution of the input and weights rounded to bf16 (the
    /// products exact, the sums in f32 in another order).
    #[test]
    fn bf16_operand_conv_equals_candles_on_the_rounded_values() {
        if !crate::cpu::test_has("avx512_bf16") {
            return;
        }
        let round = |t: &candle_core::Tensor| {
            t.to_dtype(candle_core::DType::BF16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
        };
        for &(b, cin, cout, h, w, k, p) in &[
            (2, 5, 7, 9, 13, 3, 1),
            (1, 41, 33, 17, 6, 3, 1),
            (2, 12, 20, 5, 4, 1, 0),
            // c_in a multiple of 32: on the AMX tiles where the CPU has them.
            (1, 64, 33, 17, 6, 3, 1),
            (2, 32, 20, 5, 4, 1, 0),
            (1, 96, 3, 40, 37, 3, 1),
        ] {
            let x = crate::cpu::normal_tensor((b, cin, h, w), 1.0, 4);
            let wt = crate::cpu::normal_tensor((cout, cin, k, k), 0.2, 5);
            let bias = crate::cpu::normal_tensor(cout, 1.0, 6);
            let want = round(&x)
                .conv2d(&round(&wt), p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let conv = PackedConv2d::new(
                &wt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                Some(bias.to_vec1().unwrap()),
                (cout, cin, k, p),
                Operands::Bf16,
            );
            assert_eq!(conv.operands(), Operands::Bf16);
            if cin % 32 == 0 && crate::cpu::test_has("amx") {
                assert!(matches!(conv.taps, Taps::Amx(_)), "not on the AMX tiles");
            }
            both_layouts_equal(&conv, &x, &want, 1e-5);
        }
    }
}
