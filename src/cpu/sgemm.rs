//! f32 matrix products on AVX-512, for the CPU f32 path.
//!
//! `C = A · B (+ bias)` with A (m x k) f32 row-major and B packed once (at load, for a linear layer's
//! weight) into panels of 32 columns, each k x 32 contiguous. The panels hold f32, or bf16 (a bf16
//! layer on a CPU without AMX or a fast AVX512-BF16: half the memory, each micro-panel widened to
//! f32 exactly before the rows pass it, so the product is the f32 product of the bf16 values). A
//! may be bf16 too, widened a block at a time, and the output bf16, each sum rounded once as the
//! kernel stores it ([`matmul_bf16`]). GotoBLAS-style blocking: per task, a
//! block of A rows x KC is copied into micro-panels (MR rows interleaved per k), each 32-column
//! B micro-panel (KC x 32) stays in L2 while every MR-row micro-panel of A streams past it,
//! and a 14 x 32 micro-kernel keeps 28 vector accumulators. Products are summed in f32 and the bias
//! added once at the end, as `x·Wᵀ + b` computes it.
//!
//! [`available`] says whether the CPU has AVX-512F and `MMDIT_AVX512=0` did not turn it off
//! ([`super::features`]); callers then use candle's matmul, and the tests compare the two.

use super::aligned::{Aligned, Zeroed};
use super::OutElem;
use half::bf16;
use rayon::prelude::*;

/// Columns per B panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per micro-kernel.
pub const MR: usize = 14;
/// k per block. A B micro-panel (256 KiB) streams from L2 (its rows fetched into L1 ahead, [`PREFETCH`])
/// rather than sitting in L1, but every further block of k makes each task pass over its part of the
/// output again, whose lines come from L3 or memory: on a 2-core Zen 4, 256 measured 176-186 GFLOP/s
/// on the transformers' shapes, 1024 208-214; on a 2-core Ice Lake, one thread, 1024 122-130 and 2048
/// 131-140 (with the prefetch; `examples/gemm_bench.rs`, docs/performance.md).
const KC: usize = 2048;
/// How many rows of B's micro-panel ahead of its FMAs the micro-kernel asks for in L1: the hardware
/// prefetchers alone left it waiting on L2 (16 rows: 4-6% on Ice Lake, one thread; 8 and 24-32 no
/// better).
const PREFETCH: usize = 16;
/// Rows per task (a multiple of MR).
const MC: usize = 32 * MR;

/// Whether the AVX-512 f32 path can be used (the feature switch, [`super::features`]).
pub fn available() -> bool {
    super::features().avx512
}

/// What B's panels hold.
pub trait PanelElem: Zeroed {
    /// Stored as bf16, widened to f32 by the kernel.
    const BF16: bool;

    /// One panel from `rows` (<= [`NR`]) rows of w given contiguous (`w` holds rows x k):
    /// `panel[kk NR + c] = w[c k + kk]`, columns beyond the rows left as they are.
    fn fill_panel(w: &[Self], rows: usize, panel: &mut [Self]) {
        fill_panel_by_rows(w, rows, panel)
    }

    /// Part of a panel as the f32 the kernel multiplies: f32 itself; bf16 widened (exactly) into
    /// `buf`.
    fn as_f32<'a>(part: &'a [Self], buf: &'a mut Aligned<f32>) -> &'a [f32];
}

/// [`PanelElem::fill_panel`] one panel row at a time: contiguous writes, and reads from 32 streams
/// whose cache lines each serve several consecutive rows.
fn fill_panel_by_rows<E: Copy>(w: &[E], rows: usize, panel: &mut [E]) {
    let k = panel.len() / NR;
    for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
        for (c, d) in dst.iter_mut().take(rows).enumerate() {
            *d = w[c * k + kk];
        }
    }
}

impl PanelElem for f32 {
    const BF16: bool = false;

    /// With AVX-512: 16 x 16 blocks transposed in registers ([`super::transpose`]).
    fn fill_panel(w: &[f32], rows: usize, panel: &mut [f32]) {
        let k = panel.len() / NR;
        assert!(rows <= NR && w.len() >= rows * k);
        if available() {
            // SAFETY: AVX-512 is available; w holds rows x k values and the panel k x NR
            // (asserted above), written rows wide at stride NR.
            unsafe {
                super::transpose::transpose(w.as_ptr(), k, (rows, k), panel.as_mut_ptr(), NR, rows)
            }
        } else {
            fill_panel_by_rows(w, rows, panel)
        }
    }

    fn as_f32<'a>(part: &'a [f32], _: &'a mut Aligned<f32>) -> &'a [f32] {
        part
    }
}

impl PanelElem for bf16 {
    const BF16: bool = true;

    fn as_f32<'a>(part: &'a [bf16], buf: &'a mut Aligned<f32>) -> &'a [f32] {
        buf.resize(part.len());
        super::elementwise::widen_bf16(part, buf);
        buf
    }
}

/// B (k x n) packed: panel p holds columns 32p .. 32p + 32 as k rows of 32 (zero beyond n).
#[derive(Debug, Clone)]
pub struct Packed<E: PanelElem> {
    k: usize,
    n: usize,
    data: Aligned<E>,
}

/// f32 panels.
pub type PackedF32 = Packed<f32>;
/// bf16 panels, computed in f32.
pub type PackedBf16 = Packed<bf16>;

impl<E: PanelElem> Packed<E> {
    /// From B given transposed, as a (n x k) row-major matrix (a linear layer's weight).
    pub fn from_nk(w: &[E], n: usize, k: usize) -> Self {
        Self::from_nk_with(w, n, k, |_| ())
    }

    /// [`Self::from_nk`], passing `done` each run of w's rows once it is packed (in order, about
    /// 16 MiB at a time): a weight read from a file mapping can release those pages at once.
    pub fn from_nk_with(w: &[E], n: usize, k: usize, done: impl Fn(&[E])) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        let mut p = Self::zeroed(k, n);
        super::pack_in_runs(&mut p.data, (k * NR, NR), w, (n, k), done, |nb, panel| {
            let c0 = nb * NR;
            let rows = n.min(c0 + NR) - c0;
            E::fill_panel(&w[c0 * k..(c0 + rows) * k], rows, panel);
        });
        p
    }

    /// From B as a (k x n) row-major matrix.
    pub fn from_kn(b: &[E], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "matrix is not {k} x {n}");
        let mut p = Self::zeroed(k, n);
        let fill = |nb: usize, panel: &mut [E]| {
            let cols = NR.min(n - nb * NR);
            for kk in 0..k {
                panel[kk * NR..kk * NR + cols].copy_from_slice(&b[kk * n + nb * NR..][..cols]);
            }
        };
        if k == 0 {
            return p;
        }
        if k * n >= 1 << 16 {
            p.data
                .par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(nb, panel)| fill(nb, panel));
        } else {
            // Small (attention's per-head v): not worth the pool.
            for (nb, panel) in p.data.chunks_mut(k * NR).enumerate() {
                fill(nb, panel)
            }
        }
        p
    }

    fn zeroed(k: usize, n: usize) -> Self {
        Self {
            k,
            n,
            data: Aligned::zeroed(n.div_ceil(NR) * NR * k),
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// B as the kernel reads it: k x 32 micro-panels of f32, 64-byte aligned, zero beyond n.
pub trait Panels: super::PackedOperand {
    /// Rows k0 .. k0 + kc of panel p (kc x [`NR`] f32, each row of 32 64-byte aligned): where they
    /// lie, or made in `buf`.
    ///
    /// # Safety
    /// AVX-512F available; p < the panel count and k0 + kc <= k.
    unsafe fn micro_panel<'a>(
        &'a self,
        p: usize,
        k0: usize,
        kc: usize,
        buf: &'a mut Aligned<f32>,
    ) -> &'a [f32];
}

impl<E: PanelElem> Panels for Packed<E> {
    unsafe fn micro_panel<'a>(
        &'a self,
        p: usize,
        k0: usize,
        kc: usize,
        buf: &'a mut Aligned<f32>,
    ) -> &'a [f32] {
        E::as_f32(&self.data[(p * self.k + k0) * NR..][..kc * NR], buf)
    }
}

/// B given transposed, as a linear layer's (n x k) row-major weight, read where it lies (a file
/// mapping): each micro-panel is made in a per-thread buffer as the product reaches it, holding
/// the values a [`Packed`] panel of the layer holds, so the product is bit for bit the packed
/// one's. No copy of the weight is made, for a layer that runs too few times to repay packing (a
/// text encoder, once per prompt); every product pays the transposes instead (each value of the
/// weight once per 448 rows of A, or per task).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    w: RowValues<'a>,
    k: usize,
    n: usize,
}

/// What a [`Rows`] weight holds, and the values the product takes from it.
#[derive(Debug, Clone, Copy)]
pub enum RowValues<'a> {
    /// f32, taken as they are (an f32 layer).
    F32(&'a [f32]),
    /// f32, taken rounded to bf16 as a bf16 layer's conversion rounds them ([`PackedBf16`] of
    /// the rounded values).
    F32AsBf16(&'a [f32]),
    /// bf16, widened exactly ([`PackedBf16`]).
    Bf16(&'a [bf16]),
}

impl RowValues<'_> {
    fn len(&self) -> usize {
        match self {
            RowValues::F32(w) | RowValues::F32AsBf16(w) => w.len(),
            RowValues::Bf16(w) => w.len(),
        }
    }

    /// Whether a layer of this weight is a bf16 layer (bf16 panels).
    pub fn bf16(&self) -> bool {
        !matches!(self, RowValues::F32(_))
    }
}

impl<'a> Rows<'a> {
    /// Panics unless `w` holds n x k values.
    pub fn new(w: RowValues<'a>, n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        Self { w, k, n }
    }
}

impl super::PackedOperand for Rows<'_> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

thread_local! {
    /// Per-thread rows of a bf16 [`Rows`] weight, widened before their transpose.
    static ROWS_WIDE: std::cell::RefCell<Aligned<f32>> = const { std::cell::RefCell::new(Aligned::new()) };
}

impl Panels for Rows<'_> {
    unsafe fn micro_panel<'a>(
        &'a self,
        p: usize,
        k0: usize,
        kc: usize,
        buf: &'a mut Aligned<f32>,
    ) -> &'a [f32] {
        let (rows, k) = (NR.min(self.n - p * NR), self.k);
        assert!(k0 + kc <= k, "micro-panel beyond k");
        buf.resize(kc * NR);
        let transpose = |src: &[f32], lds: usize, buf: &mut Aligned<f32>| {
            // (The weight's rows p NR .. + rows from column k0, or their widened copy.)
            assert!(src.len() >= (rows - 1) * lds + kc, "weight rows too short");
            // SAFETY: AVX-512F is available (the caller's contract); src holds `rows` rows of kc
            // values at stride lds (asserted; rows >= 1 below n, p being below the panel count);
            // buf holds kc rows of NR (resized above), written rows wide then zeros to NR.
            unsafe {
                super::transpose::transpose(src.as_ptr(), lds, (rows, kc), buf.as_mut_ptr(), NR, NR)
            }
        };
        let at = p * NR * k + k0;
        match self.w {
            RowValues::F32(w) => transpose(&w[at..], k, buf),
            RowValues::F32AsBf16(w) => {
                transpose(&w[at..], k, buf);
                super::elementwise::through_bf16(buf);
            }
            RowValues::Bf16(w) => ROWS_WIDE.with(|wide| {
                let wide = &mut *wide.borrow_mut();
                wide.resize(rows * kc);
                for (r, dst) in wide.chunks_exact_mut(kc.max(1)).take(rows).enumerate() {
                    super::elementwise::widen_bf16(&w[at + r * k..][..kc], &mut dst[..kc]);
                }
                transpose(wide, kc, buf);
            }),
        }
        buf
    }
}

/// `out (m x n, row stride ldo) = a (m x k, row stride lda) · b (+ bias)`, on the rayon pool.
/// Panics if [`available`] is false or the slices are too short for the shapes.
pub fn matmul<B: Panels>(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &B,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_taps(a, &[0], m, lda, std::slice::from_ref(b), bias, out, ldo)
}

/// `out (m x n) = Σ_t a[offsets[t] ..] (m x k, row stride lda) · bs[t] (+ bias)`: a sum of products
/// whose left operands are one matrix read from shifted starts -- a convolution as the sum over its
/// kernel taps, with no im2col copy. Each task runs all the taps over its block of rows, so the
/// partial sums stay in cache. All `bs` have the same k and n. On the rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul_taps<B: Panels>(
    a: &[f32],
    offsets: &[usize],
    m: usize,
    lda: usize,
    bs: &[B],
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    product::<f32, B, f32, false>().taps(a, offsets, m, lda, bs, bias, out, ldo, false)
}

/// `out (m x n, row stride ldo) = gelu_tanh(a (m x k, row stride lda) · b (+ bias))`: [`matmul`]
/// with the tanh-GELU applied to each output tile in registers before the kernel stores it: the
/// same values as [`super::elementwise::gelu_tanh_f32`] of the product, without a pass of its own.
/// On the rayon pool; panics as [`matmul`] does.
pub fn matmul_gelu<B: Panels>(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &B,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    product::<f32, B, f32, true>().one(a, m, lda, b, bias, out, ldo, false)
}

/// `out (m x n, row stride ldo) = a (m x k, row stride lda) · b (+ bias)` for bf16 in and out:
/// A widened exactly a block at a time, the f32 sums (with the bias) rounded once as the kernel
/// stores them, and with `gelu` the tanh-GELU of that bf16 value rounded again -- the values of
/// widening A, [`matmul`], a rounding pass (and a bf16 GELU pass), without the f32 copies. On the
/// rayon pool; panics as [`matmul`] does.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16<B: Panels>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &B,
    bias: Option<&[f32]>,
    out: &mut [bf16],
    ldo: usize,
    gelu: bool,
) {
    let product = match gelu {
        false => product::<bf16, B, bf16, false>(),
        true => product::<bf16, B, bf16, true>(),
    };
    product.one(a, m, lda, b, bias, out, ldo, false)
}

/// [`matmul`], or with `gelu` [`matmul_gelu`], into a new (m x n) row-major vector, written once
/// (without zeroing it first).
pub fn matmul_vec<B: Panels>(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &B,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Vec<f32> {
    match gelu {
        false => product::<f32, B, f32, false>().vec(a, m, lda, b, bias),
        true => product::<f32, B, f32, true>().vec(a, m, lda, b, bias),
    }
}

/// [`matmul_bf16`] into a new (m x n) row-major vector, written once (without zeroing it first).
pub fn matmul_bf16_vec<B: Panels>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &B,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Vec<bf16> {
    match gelu {
        false => product::<bf16, B, bf16, false>().vec(a, m, lda, b, bias),
        true => product::<bf16, B, bf16, true>().vec(a, m, lda, b, bias),
    }
}

/// `out (m x n, row stride ldo) += a (m x k, row stride lda) · b`, on the rayon pool (a second
/// product added to a first, as a LoRA term to its layer's). Panics as [`matmul`] does.
pub fn matmul_add<B: Panels>(a: &[f32], m: usize, lda: usize, b: &B, out: &mut [f32], ldo: usize) {
    product::<f32, B, f32, false>().one(a, m, lda, b, None, out, ldo, true)
}

/// As [`matmul`] without bias, on the calling thread (for callers that parallelise outside).
pub fn matmul_serial<B: Panels>(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &B,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_serial_as(a, m, lda, b, out, ldo)
}

/// [`matmul_serial`] for A of f32 or bf16 (widened exactly) into an f32 or bf16 output (each sum
/// rounded once as the kernel stores it).
pub(crate) fn matmul_serial_as<A: AElem, B: Panels, O: OutElem>(
    a: &[A],
    m: usize,
    lda: usize,
    b: &B,
    out: &mut [O],
    ldo: usize,
) {
    product::<A, B, O, false>().serial(a, m, lda, b, out, ldo)
}

impl<E: PanelElem> super::PackedOperand for Packed<E> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// This kernel as the shared drivers ([`super::Product`]) run it, for A of element A and output
/// of element O; with `GELU`, the tanh-GELU applied to each output tile once its last block of k
/// is in.
fn product<A: AElem, B: Panels, O: OutElem, const GELU: bool>() -> super::Product<A, B, O> {
    super::Product {
        name: "AVX-512",
        available,
        block: super::Kernel::Tap(block::<A, B, O, GELU>),
        rows: (MC, MR),
    }
}

/// What A holds: f32, or bf16 widened (exactly) a block of k at a time.
pub trait AElem: Copy + Sync + 'static {
    /// Rows 0..rows, columns k0 .. k0 + kc of `a` (row stride lda) as f32: the values and their
    /// row stride; f32 where it lies, bf16 widened into `buf`.
    fn rows_f32<'a>(
        a: &'a [Self],
        rows_lda: (usize, usize),
        k0_kc: (usize, usize),
        buf: &'a mut Aligned<f32>,
    ) -> (&'a [f32], usize);
}

impl AElem for f32 {
    fn rows_f32<'a>(
        a: &'a [f32],
        (_, lda): (usize, usize),
        (k0, _): (usize, usize),
        _: &'a mut Aligned<f32>,
    ) -> (&'a [f32], usize) {
        (&a[k0.min(a.len())..], lda)
    }
}

impl AElem for bf16 {
    fn rows_f32<'a>(
        a: &'a [bf16],
        (rows, lda): (usize, usize),
        (k0, kc): (usize, usize),
        buf: &'a mut Aligned<f32>,
    ) -> (&'a [f32], usize) {
        buf.resize(rows * kc);
        for (r, dst) in buf.chunks_exact_mut(kc.max(1)).take(rows).enumerate() {
            super::elementwise::widen_bf16(&a[r * lda + k0..][..kc], &mut dst[..kc]);
        }
        (buf, kc)
    }
}

thread_local! {
    /// Per-thread packed micro-panels of A.
    static APACK: std::cell::RefCell<Aligned<f32>> = const { std::cell::RefCell::new(Aligned::new()) };
    /// Per-thread block of bf16 A, widened to f32.
    static AWIDE: std::cell::RefCell<Aligned<f32>> = const { std::cell::RefCell::new(Aligned::new()) };
    /// Per-thread B micro-panel of bf16 panels, widened to f32.
    static BWIDE: std::cell::RefCell<Aligned<f32>> = const { std::cell::RefCell::new(Aligned::new()) };
}

/// Rows 0..rows of a times panels lo..hi of b into out (row stride ldo), added to what out holds
/// when `accumulate` (f32 out only); with `GELU`, each finished tile put through the tanh-GELU as
/// it is stored ([`OutElem::dest`]). bf16 A is widened a block of k at a time and bf16 panels a
/// micro-panel at a time into per-thread f32 buffers, which every group of rows then reads
/// (widening B in the kernel, on every group's pass, kept it at about 3/4 of the f32 rate).
///
/// # Safety
/// AVX-512F must be available. `a` holds `rows` rows at stride lda, each at least b.k long; `out`
/// is valid for reads and writes of rows 0..rows at stride ldo, columns 32 lo .. min(32 hi, n),
/// and no other thread touches them during the call; hi <= the panel count. No alignment is
/// required of a or out (unaligned loads and stores); b's panels are 64-byte aligned (`Aligned`).
#[allow(clippy::too_many_arguments)]
unsafe fn block<A: AElem, B: Panels, O: OutElem, const GELU: bool>(
    a: &[A],
    rows: usize,
    lda: usize,
    b: &B,
    lo: usize,
    hi: usize,
    bias: Option<&[f32]>,
    out: *mut O,
    ldo: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k(), b.n());
    let groups = rows.div_ceil(MR);
    let in_place = super::reads_a_in_place(hi - lo, rows, KC.min(k), size_of::<f32>());
    let dest = O::dest(out, ldo, GELU);
    let sink = super::Sink::new(dest, rows, (lo, hi), k > KC, accumulate);
    let (mut aw, mut bw) = (AWIDE.with(|a| a.take()), BWIDE.with(|b| b.take()));
    APACK.with(|ap| {
        let ap = &mut *ap.borrow_mut();
        for k0 in (0..k.max(1)).step_by(KC) {
            let kc = KC.min(k - k0);
            // A's rows from column k0 as f32, at their row stride.
            let (a, lda) = A::rows_f32(a, (rows, lda), (k0, kc), &mut aw);
            // Where the rows of A start, and the row stride the micro-kernel reads them at.
            let (base, stride) = if in_place {
                (a.as_ptr(), lda)
            } else {
                // A rows 0..rows, columns k0..k0+kc, as groups of MR rows interleaved per k (not
                // cleared first: every value is written, the last group's rows beyond `rows`
                // with zeros).
                ap.resize(groups * MR * kc);
                for g in 0..groups {
                    let dst = &mut ap[g * MR * kc..(g + 1) * MR * kc];
                    let live = MR.min(rows - g * MR);
                    let src = &a[g * MR * lda..];
                    assert!(src.len() >= (live - 1) * lda + kc);
                    // SAFETY: AVX-512 is available (the caller's contract); src holds kc values at
                    // r lda for r < live (asserted), dst kc rows of MR (rows live..MR zero).
                    unsafe {
                        super::transpose::transpose(
                            src.as_ptr(),
                            lda,
                            (live, kc),
                            dst.as_mut_ptr(),
                            MR,
                            MR,
                        )
                    };
                }
                (ap.as_ptr(), 0)
            };
            // Group g's first value: in place, row g MR; copied, its micro-panel.
            let group = |g: usize| match in_place {
                true => g * MR * lda,
                false => g * MR * kc,
            };
            let first = k0 == 0;
            let last = k0 + kc >= k;
            // (A constant per call: the branch is taken once.)
            let run = match in_place {
                false => kernel::run::<false>,
                true => kernel::run::<true>,
            };
            for p in lo..hi {
                let cols = NR.min(n - p * NR);
                // SAFETY: AVX-512F is available (the caller's contract); p < hi <= the panel
                // count, and k0 + kc <= k.
                let bp = unsafe { b.micro_panel(p, k0, kc, &mut bw) }.as_ptr();
                let bias = match (last, bias) {
                    (true, Some(bias)) => bias[p * NR..].as_ptr(),
                    _ => std::ptr::null(),
                };
                for g in 0..groups {
                    let live = MR.min(rows - g * MR);
                    // SAFETY: AVX-512 is available (the caller's contract). What the kernel reads
                    // of A is in bounds: in place, kc columns of rows g MR + r < rows of a (from
                    // column k0, at stride lda, where rows_f32 put them); copied, group g's
                    // micro-panel of ap (kc x MR). The micro-panel of b (kc x 32 f32, from a
                    // 64-byte aligned buffer at a multiple of 32 elements -- the panels or bw --
                    // so each row of 32 is 64-byte aligned) is in bounds; the sink's partial-sum
                    // and bf16 tiles of rows g MR .. + live and columns 32 p .. + cols are inside
                    // the block the caller lent us or the sink's buffer (the partial sums are
                    // touched only when the kernel loads them or does not store into bf16); bias
                    // is null or has cols values from 32 p.
                    unsafe {
                        run(
                            base.add(group(g)),
                            stride,
                            bp,
                            kc,
                            sink.partial(g * MR, p),
                            live,
                            cols,
                            accumulate || !first,
                            bias,
                            sink.store(g * MR, p, last),
                        )
                    };
                }
            }
        }
    });
    AWIDE.with(|a| a.replace(aw));
    BWIDE.with(|b| b.replace(bw));
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{MR, NR, PREFETCH};
    use std::arch::x86_64::*;

    /// `c[0..rows, 0..cols] (+)= a · b (+ bias)`, stored as `store` says
    /// ([`super::super::rows32::store`]): a is kc x MR (interleaved), or with `IN_PLACE` rows of kc
    /// at stride `lda` (read for r < rows only; rows beyond repeat the last); b kc x 32.
    ///
    /// # Safety
    /// AVX-512F available. `a` is valid for reads of kc x MR floats (with `IN_PLACE`: of kc floats
    /// at `a + r lda` for r < rows, rows >= 1); `b` for kc x 32 floats, each row of 32 64-byte
    /// aligned (aligned vector loads); `c` for reads (when `load`) and writes (without a bf16 tile)
    /// of `rows` (<= MR) rows of `cols` (<= 32) floats at stride ldc, at any alignment (masked
    /// unaligned access); a bf16 tile of `store` likewise for writes of bf16 at its stride; `bias`
    /// is null or valid for `cols` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run<const IN_PLACE: bool>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        kc: usize,
        (c, ldc): (*mut f32, usize),
        rows: usize,
        cols: usize,
        load: bool,
        bias: *const f32,
        store: super::super::Store,
    ) {
        // SAFETY: every pointer below stays inside the extents the caller vouches for (see
        // # Safety); the masks keep loads and stores of c and bias within `cols` columns.
        unsafe {
            let (m0, m1) = super::super::rows32::masks(cols);
            let mut acc = super::super::rows32::start::<MR>(load, rows, c, ldc);
            let last = rows.max(1) - 1;
            let row: [*const f32; MR] = match IN_PLACE {
                true => std::array::from_fn(|r| a.add(r.min(last) * lda)),
                false => [std::ptr::null(); MR],
            };
            for kk in 0..kc {
                // B's row PREFETCH ahead (past the micro-panel's end near the loop's: a prefetch
                // is only a hint, which never faults).
                let ahead = b.wrapping_add((kk + PREFETCH) * NR) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                let bk = b.add(kk * NR);
                let (b0, b1) = (_mm512_load_ps(bk), _mm512_load_ps(bk.add(16)));
                let ak = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = match IN_PLACE {
                        true => _mm512_set1_ps(row[r].add(kk).read_unaligned()),
                        false => _mm512_set1_ps(*ak.add(r)),
                    };
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
            let masks = (m0, m1);
            super::super::rows32::store(&mut acc, rows, (c, ldc), masks, bias, load, store);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    /// # Safety
    /// Never called: [`super::available`] is false off x86_64.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run<const IN_PLACE: bool>(
        _: *const f32,
        _: usize,
        _: *const f32,
        _: usize,
        (_, _): (*mut f32, usize),
        _: usize,
        _: usize,
        _: bool,
        _: *const f32,
        _: super::super::Store,
    ) {
        unreachable!("AVX-512 exists only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, mut seed: u64) -> Vec<f32> {
        crate::cpu::lcg_uniform(len, &mut seed, -1.0, 1.0)
    }

    /// Odd shapes: partial row groups, partial panels, k over several blocks and k = 0.
    /// The product with its GELU folded in against the product and then the GELU pass, bit for bit
    /// (k over several blocks included: the GELU only once the last is in), the padding between
    /// rows untouched.
    #[test]
    fn sgemm_with_gelu_equals_sgemm_then_gelu() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n) in &SHAPES {
            let (lda, ldo) = (k + 3, n + 5);
            let a = random(m * lda, 4);
            let w = random(n * k, 5);
            let bias = random(n, 6);
            let packed = PackedF32::from_nk(&w, n, k);
            let mut plain = vec![0f32; m * n];
            matmul(&a, m, lda, &packed, Some(&bias), &mut plain, n);
            let plain =
                candle_core::Tensor::from_vec(plain, (m, n), &candle_core::Device::Cpu).unwrap();
            let want: Vec<f32> = super::super::elementwise::gelu_tanh_f32(&plain)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut got = vec![f32::NAN; m * ldo];
            matmul_gelu(&a, m, lda, &packed, Some(&bias), &mut got, ldo);
            // Into new vectors, written once: the same values, with and without the GELU.
            assert_eq!(matmul_vec(&a, m, lda, &packed, Some(&bias), true), want);
            let plain = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(matmul_vec(&a, m, lda, &packed, Some(&bias), false), plain);
            for i in 0..m {
                assert_eq!(
                    &got[i * ldo..i * ldo + n],
                    &want[i * n..(i + 1) * n],
                    "{m}x{k}x{n}"
                );
                assert!(got[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()));
            }
        }
    }

    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (9, 2 * KC + 77, 40),
        (5, 70, 33),
        (300, 96, 700),
        (37, 1000, 65),
        (13, 600, 16),
        (145, 257, 64),
        (4, 0, 9),
        (460, 1030, 300),
    ];

    /// Odd shapes, strided rows, bias, parallel and serial: equal to an f64 reference within f32
    /// summation error.
    #[test]
    fn sgemm_equals_the_reference() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n) in &SHAPES {
            let (lda, ldo) = (k + 3, n + 5);
            let a = random(m * lda, 1);
            let w = random(n * k, 2);
            let bias = random(n, 3);
            let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let want: Vec<f32> = crate::cpu::reference_product(&f(&a), m, lda, &f(&w), n, k)
                .into_iter()
                .map(|s| s as f32)
                .collect();
            let packed = PackedF32::from_nk(&w, n, k);
            let tol = 1e-6 * (k as f32).sqrt() + 1e-7;
            let mut got = vec![f32::NAN; m * ldo];
            matmul(&a, m, lda, &packed, Some(&bias), &mut got, ldo);
            let mut serial = vec![f32::NAN; m * ldo];
            matmul_serial(&a, m, lda, &packed, &mut serial, ldo);
            for i in 0..m {
                for j in 0..n {
                    let (g, s, w) = (got[i * ldo + j], serial[i * ldo + j], want[i * n + j]);
                    // (Summation error grows with the sums too: k = 2125 reaches |w| ~ 20.)
                    let tol = tol + 2e-6 * w.abs();
                    assert!(
                        (g - bias[j] - w).abs() <= tol,
                        "{m}x{k}x{n} [{i},{j}]: {} vs {w}",
                        g - bias[j]
                    );
                    assert!(
                        (s - w).abs() <= tol,
                        "{m}x{k}x{n} [{i},{j}]: serial {s} vs {w}"
                    );
                }
                // The padding between rows is not written.
                assert!(got[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()));
            }
            let bt = crate::cpu::transpose(&w, n, k);
            assert_eq!(&PackedF32::from_kn(&bt, k, n).data[..], &packed.data[..]);
        }
    }

    /// The weight read where it lies ([`Rows`]) gives the packed panels' products to the bit: with
    /// bias, through the GELU, added to an output and serial, over partial last panels and k over
    /// several blocks; and for a bf16 layer, from f32 values rounded as it goes or from bf16.
    #[test]
    fn sgemm_on_rows_equals_sgemm_on_packed_panels() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n) in SHAPES.iter().chain(&[(3, 40, 70), (30, 4200, 33)]) {
            let (lda, ldo) = (k + 3, n + 5);
            let a = random(m * lda, 4);
            let w = random(n * k, 5);
            let bias = random(n, 6);
            let (packed, rows) = (
                PackedF32::from_nk(&w, n, k),
                Rows::new(RowValues::F32(&w), n, k),
            );
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut out = random(m * ldo, 7);
                f(&mut out);
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let shape = format!("{m}x{k}x{n}");
            assert_eq!(
                run(&|o| matmul(&a, m, lda, &rows, Some(&bias), o, ldo)),
                run(&|o| matmul(&a, m, lda, &packed, Some(&bias), o, ldo)),
                "{shape}"
            );
            assert_eq!(
                run(&|o| matmul_gelu(&a, m, lda, &rows, None, o, ldo)),
                run(&|o| matmul_gelu(&a, m, lda, &packed, None, o, ldo)),
                "{shape} gelu"
            );
            assert_eq!(
                run(&|o| matmul_add(&a, m, lda, &rows, o, ldo)),
                run(&|o| matmul_add(&a, m, lda, &packed, o, ldo)),
                "{shape} add"
            );
            assert_eq!(
                run(&|o| matmul_serial(&a, m, lda, &rows, o, ldo)),
                run(&|o| matmul_serial(&a, m, lda, &packed, o, ldo)),
                "{shape} serial"
            );
            // A bf16 layer: its bf16 weight, or an f32 weight rounded as the layer's conversion
            // rounds it, against bf16 panels of the rounded values; f32 and bf16 A.
            let wb: Vec<bf16> = w.iter().map(|&v| crate::cpu::round_bf16(v)).collect();
            let packed = PackedBf16::from_nk(&wb, n, k);
            let ab: Vec<bf16> = a.iter().map(|&v| crate::cpu::round_bf16(v)).collect();
            for values in [RowValues::F32AsBf16(&w), RowValues::Bf16(&wb)] {
                let rows = Rows::new(values, n, k);
                assert_eq!(
                    run(&|o| matmul(&a, m, lda, &rows, Some(&bias), o, ldo)),
                    run(&|o| matmul(&a, m, lda, &packed, Some(&bias), o, ldo)),
                    "{shape} {values:?}"
                );
                let bf = |b: &dyn Fn(&mut [bf16])| {
                    let mut out = vec![bf16::NAN; m * ldo];
                    b(&mut out);
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    bf(&|o| matmul_bf16(&ab, m, lda, &rows, Some(&bias), o, ldo, true)),
                    bf(&|o| matmul_bf16(&ab, m, lda, &packed, Some(&bias), o, ldo, true)),
                    "{shape} {values:?} bf16"
                );
            }
        }
    }

    /// bf16 panels widen each value exactly and sum in the f32 kernel's order: the f32 panels' result
    /// of the same values, to the bit (parallel and serial, with bias).
    #[test]
    fn sgemm_on_bf16_panels_equals_f32_panels_of_the_same_values() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n) in &SHAPES {
            let (lda, ldo) = (k + 3, n + 5);
            let a = random(m * lda, 1);
            let w: Vec<bf16> = random(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let bias = random(n, 3);
            let (pb, pf) = (PackedBf16::from_nk(&w, n, k), PackedF32::from_nk(&wf, n, k));
            // The output's bits (NaN where nothing is written).
            let bits = |f: &dyn Fn(&mut [f32])| {
                let mut o = vec![f32::NAN; m * ldo];
                f(&mut o);
                o.into_iter().map(f32::to_bits).collect::<Vec<_>>()
            };
            assert_eq!(
                bits(&|o| matmul(&a, m, lda, &pb, Some(&bias), o, ldo)),
                bits(&|o| matmul(&a, m, lda, &pf, Some(&bias), o, ldo)),
                "{m}x{k}x{n} parallel"
            );
            assert_eq!(
                bits(&|o| matmul_serial(&a, m, lda, &pb, o, ldo)),
                bits(&|o| matmul_serial(&a, m, lda, &pf, o, ldo)),
                "{m}x{k}x{n} serial"
            );
            let bt = crate::cpu::transpose(&w, n, k);
            assert_eq!(&PackedBf16::from_kn(&bt, k, n).data[..], &pb.data[..]);
        }
    }

    /// bf16 in and out: A widened, the f32 product rounded once, and the bf16 GELU of that, bit
    /// for bit against the f32 product of the widened values, rounded (and put through the bf16
    /// GELU pass); bf16 and f32 panels, strided rows, k over several blocks, the padding between
    /// rows untouched.
    #[test]
    fn sgemm_bf16_in_and_out_equals_the_rounded_f32_product() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        for &(m, k, n) in &SHAPES {
            let (lda, ldo) = (k + 3, n + 5);
            let a: Vec<bf16> = random(m * lda, 1).into_iter().map(bf16::from_f32).collect();
            let af: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
            let w: Vec<bf16> = random(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let bias = random(n, 3);
            let (pb, pf) = (PackedBf16::from_nk(&w, n, k), {
                let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                PackedF32::from_nk(&wf, n, k)
            });
            let mut plain = vec![0f32; m * n];
            matmul(&af, m, lda, &pf, Some(&bias), &mut plain, n);
            let rounded: Vec<bf16> = plain.iter().map(|&v| crate::cpu::round_bf16(v)).collect();
            let t =
                candle_core::Tensor::from_vec(rounded.clone(), (m, n), &candle_core::Device::Cpu);
            let gelu: Vec<bf16> = super::super::elementwise::gelu_tanh_bf16(&t.unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let nan = bf16::from_bits(0x7fc1);
            for (want, g) in [(&rounded, false), (&gelu, true)] {
                let mut got = vec![nan; m * ldo];
                matmul_bf16(&a, m, lda, &pb, Some(&bias), &mut got, ldo, g);
                let mut got_f = vec![nan; m * ldo];
                matmul_bf16(&a, m, lda, &pf, Some(&bias), &mut got_f, ldo, g);
                // Into a new vector, written once: the same values.
                let fresh = matmul_bf16_vec(&a, m, lda, &pb, Some(&bias), g);
                assert_eq!(fresh.len(), m * n);
                for i in 0..m {
                    assert_eq!(
                        fresh[i * n..(i + 1) * n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        want[i * n..(i + 1) * n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "{m}x{k}x{n} gelu {g}, new vector, row {i}"
                    );
                    let row = |v: &[bf16], ld: usize| -> Vec<u16> {
                        v[i * ld..i * ld + n].iter().map(|v| v.to_bits()).collect()
                    };
                    assert_eq!(
                        row(&got, ldo),
                        row(want, n),
                        "{m}x{k}x{n} gelu {g}, row {i}"
                    );
                    assert_eq!(row(&got_f, ldo), row(want, n), "{m}x{k}x{n} f32 panels");
                    let pad = &got[i * ldo + n..((i + 1) * ldo).min(got.len())];
                    assert!(pad.iter().all(|v| v.to_bits() == 0x7fc1), "padding written");
                }
            }
        }
    }
}
