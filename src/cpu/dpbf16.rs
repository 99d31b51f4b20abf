//! bf16 matrix products on the AVX512-BF16 dot product (`vdpbf16ps`), for bf16 layers on CPUs that
//! have it but no AMX, where it outruns the f32 FMA ([`super::Features::bf16_dot`]: AMD Zen 4 and
//! later; not Intel's Sapphire and Emerald Rapids, where it does half the FMA's multiply-adds).
//!
//! `C = A · B (+ bias)` with A (m x k) bf16 row-major and B packed once (at load, for a linear
//! layer's weight) into panels of 32 columns whose rows are *pairs* of k: pair row q of a panel holds
//! `[b(2q, j), b(2q+1, j)]` for its 32 columns j, so one vector of B is 16 columns x 2 k. Each
//! `vdpbf16ps` adds, per column, `a(i, 2q) b(2q, j) + a(i, 2q+1) b(2q+1, j)` to an f32 accumulator
//! (the bf16 products are exact in f32; the sums round to nearest even): 32 multiply-adds per
//! instruction where the f32 kernel ([`super::sgemm`]) does 16, on the same bf16 values PyTorch's
//! oneDNN multiplies on this instruction. An odd k is padded with a zero.
//!
//! The blocking is [`super::sgemm`]'s (a 14 x 32 micro-kernel with 28 accumulators; per task a
//! block of A rows is copied into micro-panels of MR rows interleaved per pair), with a longer k
//! block ([`KC`]). Results are f32 (the caller rounds once, after the bias) and a sum over
//! shifted starts of A ([`matmul_taps`]) is a convolution without im2col, as in `sgemm`.
//!
//! [`available`] says whether the CPU has AVX-512F with AVX512-BF16 and neither `MMDIT_AVX512=0`
//! nor `MMDIT_AVX512_BF16=0` turned it off ([`super::features`]).

use super::aligned::Aligned;
use super::OutElem;
use half::bf16;
use rayon::prelude::*;

/// Columns per B panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per micro-kernel.
pub const MR: usize = 14;
/// k per block (1024 pairs). A B micro-panel (128 KiB) then streams from L2 rather than sitting in
/// L1, but every further block of k reloads the 28 accumulators: on a 2-core Zen 4, 256/512/1024/2048
/// measured about 330/355/400/410 GFLOP/s on the transformers' shapes (`examples/gemm_bench.rs`).
const KC: usize = 2048;
/// Rows per task (a multiple of MR).
const MC: usize = 32 * MR;

/// Whether the AVX512-BF16 kernel can be used (the feature switch, [`super::features`]).
pub fn available() -> bool {
    super::features().avx512_bf16
}

/// B (k x n) packed in pairs of k: panel p holds columns 32p .. 32p + 32 as k.div_ceil(2) rows of
/// 32 pairs (zero beyond n and beyond k).
#[derive(Debug, Clone)]
pub struct PackedPairs {
    k: usize,
    n: usize,
    data: Aligned<bf16>,
}

impl PackedPairs {
    /// From B given transposed, as a (n x k) row-major matrix (a linear layer's weight, attention's
    /// keys).
    pub fn from_nk(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        Self::fill_panels(k, n, |nb, dst| {
            let cols = NR.min(n - nb * NR);
            panel_from_rows(&w[nb * NR * k..][..cols * k], k, dst)
        })
    }

    /// [`Self::from_nk`] of `w` rounded to bf16 (nearest even, as [`super::rounded_to_bf16`]
    /// rounds): each panel's rows rounded into a per-thread scratch and packed from there, in runs
    /// of panels (16 MiB of w), each run's rows then passed to `done` -- no bf16 copy of the
    /// whole weight beside the panels, and a file's f32 pages released as they are packed.
    pub fn from_nk_rounded(w: &[f32], n: usize, k: usize, done: impl Fn(&[f32])) -> Self {
        thread_local! {
            static ROWS: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        let panel = 2 * NR * k.div_ceil(2);
        let mut data = Aligned::zeroed(n.div_ceil(NR) * panel);
        super::pack_in_runs(&mut data, (panel, NR), w, (n, k), done, |nb, dst| {
            let src = &w[nb * NR * k..][..NR.min(n - nb * NR) * k];
            ROWS.with(|rows| {
                let rows = &mut *rows.borrow_mut();
                rows.resize(src.len(), bf16::ZERO);
                super::elementwise::round_chunk(src, rows);
                panel_from_rows(rows, k, dst);
            })
        });
        Self { k, n, data }
    }

    /// From B as a (k x n) row-major matrix (attention's values).
    pub fn from_kn(b: &[bf16], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "matrix is not {k} x {n}");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX512-BF16's switch reports it only with AVX-512F and AVX512BW; each panel
            // is the buffer's own (fill_panels), the rows of b are in bounds (asserted above).
            return Self::fill_panels(k, n, |nb, dst| unsafe { interleave_rows(b, k, n, nb, dst) });
        }
        Self::fill(k, n, |c, kk| b[kk * n + c])
    }

    /// Packs `at(column, j)` for columns below n and j below k.
    fn fill(k: usize, n: usize, at: impl Fn(usize, usize) -> bf16 + Sync) -> Self {
        Self::fill_panels(k, n, |nb, dst| {
            let cols = NR.min(n - nb * NR);
            for (q, row) in dst.chunks_exact_mut(2 * NR).enumerate() {
                for j in 0..cols {
                    let c = nb * NR + j;
                    row[2 * j] = at(c, 2 * q);
                    if 2 * q + 1 < k {
                        row[2 * j + 1] = at(c, 2 * q + 1);
                    }
                }
            }
        })
    }

    /// Zeroed panels, each filled by `fill(panel number, panel)` (on the pool when large).
    fn fill_panels(k: usize, n: usize, fill: impl Fn(usize, &mut [bf16]) + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let mut data = Aligned::zeroed(n.div_ceil(NR) * NR * 2 * pairs);
        let panel = 2 * NR * pairs;
        if panel > 0 {
            if k * n >= 1 << 16 {
                data.par_chunks_mut(panel)
                    .enumerate()
                    .for_each(|(nb, d)| fill(nb, d));
            } else {
                // Small (attention's per-head operands): not worth the pool.
                for (nb, d) in data.chunks_mut(panel).enumerate() {
                    fill(nb, d)
                }
            }
        }
        Self { k, n, data }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The same B with an odd k made even by the zero row its packing already holds: a product
    /// whose A rows carry a zero (or any finite value) in that column gives the same sums, and
    /// reads A in place ([`block`]: whole pairs only).
    pub fn with_even_k(mut self) -> Self {
        self.k = self.k.next_multiple_of(2);
        self
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Elements per pair row of a panel (32 pairs).
    const ROW: usize = 2 * NR;
}

/// `out (m x n, row stride ldo) = a (m x k, row stride lda) · b (+ bias)` in f32, on the rayon
/// pool. Panics if [`available`] is false or the slices are too short for the shapes.
pub fn matmul(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedPairs,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_taps(a, &[0], m, lda, std::slice::from_ref(b), bias, out, ldo)
}

/// `out (m x n) = Σ_t a[offsets[t] ..] (m x k, row stride lda) · bs[t] (+ bias)`: a convolution as
/// the sum over its kernel taps ([`super::sgemm::matmul_taps`]'s contract, on bf16 A).
#[allow(clippy::too_many_arguments)]
pub fn matmul_taps(
    a: &[bf16],
    offsets: &[usize],
    m: usize,
    lda: usize,
    bs: &[PackedPairs],
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    product::<f32, false>().taps(a, offsets, m, lda, bs, bias, out, ldo, false)
}

/// `out (m x n, row stride ldo) = a (m x k, row stride lda) · b (+ bias)` in bf16: each sum (with
/// its bias) rounded once as it leaves the kernel, and with `gelu` the tanh-GELU of that bf16 value
/// rounded again -- the values of [`matmul`] followed by a rounding pass (and a bf16 GELU pass),
/// without an f32 copy of the output. On the rayon pool; panics as [`matmul`] does.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedPairs,
    bias: Option<&[f32]>,
    out: &mut [bf16],
    ldo: usize,
    gelu: bool,
) {
    let product = match gelu {
        false => product::<bf16, false>(),
        true => product::<bf16, true>(),
    };
    product.one(a, m, lda, b, bias, out, ldo, false)
}

/// [`matmul_bf16`] into a new (m x n) row-major vector, written once (without zeroing it first).
pub fn matmul_bf16_vec(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedPairs,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Vec<bf16> {
    let product = match gelu {
        false => product::<bf16, false>(),
        true => product::<bf16, true>(),
    };
    product.vec(a, m, lda, b, bias)
}

/// As [`matmul`] without bias, on the calling thread (for callers that parallelise outside).
pub fn matmul_serial(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedPairs,
    out: &mut [f32],
    ldo: usize,
) {
    product::<f32, false>().serial(a, m, lda, b, out, ldo)
}

/// One panel of B given transposed: `rows` holds the panel's columns as rows of k (at most NR of
/// them), `dst` the panel (k.div_ceil(2) rows of NR pairs, 64-byte aligned), written whole: pair
/// row q is each column's values 2q and 2q + 1 (a zero past an odd k), zeros past the columns.
fn panel_from_rows(rows: &[bf16], k: usize, dst: &mut [bf16]) {
    let cols = rows.len() / k.max(1);
    assert!(
        cols <= NR && dst.len() == 2 * NR * k.div_ceil(2),
        "panel shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(2) && super::features().avx512 {
        // A panel is the transpose of its rows read as 32-bit words (pairs of k).
        // SAFETY: AVX-512F is available; the source is `cols` rows of k / 2 words each (k even:
        // whole pairs), inside `rows`; the destination is the panel, k / 2 rows of NR words, each
        // written NR wide (zeros past cols) inside dst (asserted). Words are moved as f32 lanes by
        // shuffles and masked moves, bits unchanged.
        unsafe {
            super::transpose::transpose(
                rows.as_ptr().cast(),
                k / 2,
                (cols, k / 2),
                dst.as_mut_ptr().cast(),
                NR,
                NR,
            )
        };
        return;
    }
    for (q, row) in dst.chunks_exact_mut(2 * NR).enumerate() {
        row.fill(bf16::ZERO);
        for (j, col) in rows.chunks_exact(k).enumerate() {
            row[2 * j] = col[2 * q];
            if 2 * q + 1 < k {
                row[2 * j + 1] = col[2 * q + 1];
            }
        }
    }
}

/// Panel `nb` of a (k x n) row-major `b` into `dst`: pair row q is rows 2q and 2q + 1 of the
/// panel's columns interleaved (a zero row past an odd k), columns past n zero.
///
/// # Safety
/// AVX-512F and AVX512BW available; `b` holds k x n values, nb < n.div_ceil(NR), and `dst` holds
/// k.div_ceil(2) rows of 2 NR values at a 64-byte aligned start.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_rows(b: &[bf16], k: usize, n: usize, nb: usize, dst: &mut [bf16]) {
    use std::arch::x86_64::*;
    let c0 = nb * NR;
    let cols = NR.min(n - c0);
    let mask: __mmask32 = if cols == NR { !0 } else { (1 << cols) - 1 };
    // Lanes 2i and 2i + 1 of the first half take a[i] and b[i]; of the second, a[16 + i], b[16 + i].
    let lo = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4,
        35, 3, 34, 2, 33, 1, 32, 0,
    );
    let hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    // SAFETY: the masked loads read columns c0 .. c0 + cols < n of rows 2q and 2q + 1 < k only;
    // the stores write the two aligned vectors of pair row q < k.div_ceil(2) of dst (# Safety).
    unsafe {
        for q in 0..k.div_ceil(2) {
            let row = |r: usize| match r < k {
                true => _mm512_maskz_loadu_epi16(mask, b.as_ptr().add(r * n + c0).cast()),
                false => _mm512_setzero_si512(),
            };
            let (even, odd) = (row(2 * q), row(2 * q + 1));
            let out = dst.as_mut_ptr().add(q * 2 * NR).cast::<__m512i>();
            _mm512_store_si512(out, _mm512_permutex2var_epi16(even, lo, odd));
            _mm512_store_si512(out.add(1), _mm512_permutex2var_epi16(even, hi, odd));
        }
    }
}

impl super::PackedOperand for PackedPairs {
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

/// This kernel as the shared drivers ([`super::Product`]) run it, into output of element O; with
/// `GELU`, the tanh-GELU applied to each output tile once its last block of k is in.
fn product<O: OutElem, const GELU: bool>() -> super::Product<bf16, PackedPairs, O> {
    super::Product {
        name: "AVX512-BF16",
        available,
        block: super::Kernel::Taps(taps::<O, GELU>),
        rows: (MC, MR),
    }
}

thread_local! {
    /// Per-thread packed micro-panels of A (bf16 pairs as 32-bit words).
    static APACK: std::cell::RefCell<Aligned<u32>> = const { std::cell::RefCell::new(Aligned::new()) };
}

/// Whether a block of `rows` rows of A (stride lda) against `panels` panels of k reads A where it
/// lies: as 32-bit words of pairs, so even row starts and k only, and where the copy would not pay
/// ([`super::reads_a_in_place`]).
fn reads_in_place(lda: usize, k: usize, panels: usize, rows: usize) -> bool {
    lda.is_multiple_of(2)
        && k.is_multiple_of(2)
        && super::reads_a_in_place(panels, rows, KC.min(k), size_of::<bf16>())
}

/// The taps' sum (the [`super::Block`] of this kernel): where every tap reads A in place and k
/// fits one block (a convolution's taps over its band), each micro-kernel call runs all the taps
/// into the same accumulators, loaded and stored once per tile rather than once per tap; otherwise
/// tap by tap ([`block`]).
///
/// # Safety
/// [`super::Block`]'s contract, with AVX-512F and AVX512-BF16 available.
unsafe fn taps<O: OutElem, const GELU: bool>(args: super::BlockArgs<'_, bf16, PackedPairs, O>) {
    let (a, rows, lda, bs, (lo, hi)) = (args.a, args.rows, args.lda, args.bs, args.panels);
    let (bias, accumulate) = (args.bias, args.accumulate);
    let k = bs.first().map_or(0, |b| b.k);
    let fused = bs.len() > 1 && k <= KC && reads_in_place(lda, k, hi - lo, rows);
    if !fused {
        // SAFETY: the caller's contract is the one `block` needs for each tap.
        return unsafe { super::tap_by_tap(block::<O, GELU>, args) };
    }
    let (qc, groups) = (k / 2, rows.div_ceil(MR));
    let sink = super::Sink::new(
        O::dest(args.out, args.ldo, GELU),
        rows,
        (lo, hi),
        false,
        accumulate,
    );
    // Each tap's first pair of row 0, as 32-bit words (the kernel reads them unaligned).
    let starts: Vec<*const u32> = args
        .offsets
        .iter()
        .map(|&o| a[o..].as_ptr().cast())
        .collect();
    let mut panels: Vec<*const bf16> = Vec::with_capacity(bs.len());
    for p in lo..hi {
        let cols = NR.min(bs[0].n - p * NR);
        panels.clear();
        panels.extend(
            bs.iter()
                .map(|b| b.data[p * qc * PackedPairs::ROW..].as_ptr()),
        );
        let bias = bias.map_or(std::ptr::null(), |b| b[p * NR..].as_ptr());
        for g in 0..groups {
            let grows = MR.min(rows - g * MR);
            // SAFETY: the features are available (the caller's contract). For each tap the kernel
            // reads the words of pairs 0 .. qc of rows g MR + r < rows from that tap's start in a
            // (whole pairs: lda and k even; a holds the rows from every offset, the contract), and
            // qc rows of 64 bf16 of the tap's panel p (in bounds, 64-byte aligned rows). The sink's
            // tiles of rows g MR .. + grows and columns 32 p .. + cols are inside the block the
            // caller lent us (a single block of k: the partial sums are the output itself, touched
            // only when the kernel loads them or does not store into bf16); bias is null or has
            // cols values from 32 p.
            unsafe {
                kernel::run(
                    (&starts, g * MR * (lda / 2)),
                    (lda / 2, 1),
                    &panels,
                    qc,
                    sink.partial(g * MR, p),
                    grows,
                    cols,
                    accumulate,
                    bias,
                    sink.store(g * MR, p, true),
                )
            };
        }
    }
}

/// Rows 0..rows of a times panels lo..hi of b into out (row stride ldo), added to what out holds
/// when `accumulate` (f32 out only); with `GELU`, each finished tile put through the tanh-GELU as
/// it is stored ([`OutElem::dest`]).
///
/// A is read in place (each micro-kernel row broadcast straight from its row of `a`) when every
/// row starts on a whole pair (even lda and k) and the copy would not pay; otherwise it is copied
/// into micro-panels of MR rows interleaved per pair. The copy costs about as much as the products
/// when n is small (a convolution tap's 128 output channels), and is redone for every tap.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available. `a` holds `rows` rows at stride lda, each at least
/// b.k long; `out` is valid for reads and writes of rows 0..rows at stride ldo, columns 32 lo ..
/// min(32 hi, n), and no other thread touches them during the call; hi <= the panel count. No
/// alignment is required of a or out; b's panels are 64-byte aligned (`Aligned`).
#[allow(clippy::too_many_arguments)]
unsafe fn block<O: OutElem, const GELU: bool>(
    a: &[bf16],
    rows: usize,
    lda: usize,
    b: &PackedPairs,
    lo: usize,
    hi: usize,
    bias: Option<&[f32]>,
    out: *mut O,
    ldo: usize,
    accumulate: bool,
) {
    let k = b.k;
    let pairs = k.div_ceil(2);
    let groups = rows.div_ceil(MR);
    let dest = O::dest(out, ldo, GELU);
    let sink = super::Sink::new(dest, rows, (lo, hi), k > KC, accumulate);
    let in_place = reads_in_place(lda, k, hi - lo, rows);
    APACK.with(|ap| {
        let ap = &mut *ap.borrow_mut();
        for k0 in (0..k.max(1)).step_by(KC) {
            let kc = KC.min(k - k0);
            let qc = kc.div_ceil(2);
            // Where the micro-kernel reads group g's pairs: (first word, row stride, pair stride)
            // in 32-bit words.
            let (base, rs, ps): (*const u32, usize, usize) = if in_place {
                (a[k0..].as_ptr().cast(), lda / 2, 1)
            } else if lda.is_multiple_of(2) && kc.is_multiple_of(2) {
                // A rows 0..rows, columns k0..k0+kc, as groups of MR rows interleaved per pair:
                // each group's rows of words (pairs) transposed in registers, the last group's
                // rows beyond `rows` zero (not cleared first: every word is written).
                ap.resize(groups * MR * qc);
                for g in 0..groups {
                    let live = MR.min(rows - g * MR);
                    let src = &a[g * MR * lda + k0..];
                    assert!(src.len() >= (live - 1) * lda + kc, "A rows too short");
                    let dst = &mut ap[g * MR * qc..(g + 1) * MR * qc];
                    // SAFETY: AVX-512F is available (AVX512-BF16's switch requires it, the caller's
                    // contract). The source is `live` rows of qc words (kc bf16, whole pairs: lda
                    // and kc even) at a stride of lda / 2 words, inside a (asserted); the
                    // transpose reads them with unaligned masked loads and moves their bits
                    // unchanged. The destination is the group's qc rows of MR words, written MR
                    // wide (zeros past `live`).
                    unsafe {
                        super::transpose::transpose(
                            src.as_ptr().cast(),
                            lda / 2,
                            (live, qc),
                            dst.as_mut_ptr().cast(),
                            MR,
                            MR,
                        )
                    };
                }
                (ap.as_ptr(), 1, MR)
            } else {
                // As above, element by element (an odd row stride, or an odd last column paired
                // with zero), the first of a pair in the low half.
                ap.reset(groups * MR * qc);
                for g in 0..groups {
                    let dst = &mut ap[g * MR * qc..(g + 1) * MR * qc];
                    for r in 0..MR.min(rows - g * MR) {
                        let src = &a[(g * MR + r) * lda + k0..][..kc];
                        let mut pairs = src.chunks_exact(2);
                        for (q, p) in pairs.by_ref().enumerate() {
                            dst[q * MR + r] = p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16;
                        }
                        if let [last] = pairs.remainder() {
                            dst[(qc - 1) * MR + r] = last.to_bits() as u32;
                        }
                    }
                }
                (ap.as_ptr(), 1, MR)
            };
            // Group g's first word: in place, row g MR; packed, its micro-panel.
            let group = |g: usize| {
                (
                    g * MR * if in_place { rs } else { qc },
                    MR.min(rows - g * MR),
                )
            };
            let first = k0 == 0;
            let end = k0 + kc >= k;
            for p in lo..hi {
                let cols = NR.min(b.n - p * NR);
                let bp = b.data[(p * pairs + k0 / 2) * PackedPairs::ROW..].as_ptr();
                let bias = match (end, bias) {
                    (true, Some(bias)) => bias[p * NR..].as_ptr(),
                    _ => std::ptr::null(),
                };
                for g in 0..groups {
                    let (off, grows) = group(g);
                    // SAFETY: the features are available (the caller's contract). The kernel
                    // reads words at off + r rs + q ps for r < grows and q < qc: in place, pairs
                    // k0/2 .. + qc of rows g MR + r < rows of a (whole pairs: lda and k even, and
                    // bf16 needs only 2-byte alignment, the words are read unaligned); packed, the
                    // group's micro-panel of ap. The panel rows of b (qc rows of 64 bf16, from a
                    // 64-byte aligned buffer at a multiple of 64 elements, so each row is two
                    // aligned vectors) are in bounds; the sink's partial-sum and bf16 tiles of
                    // rows g MR .. + grows and columns 32 p .. + cols are inside the block the
                    // caller lent us or the sink's buffer (the partial sums are touched only when
                    // the kernel loads them or does not store into bf16); bias is null or has
                    // cols values from 32 p.
                    unsafe {
                        kernel::run(
                            (&[base], off),
                            (rs, ps),
                            &[bp],
                            qc,
                            sink.partial(g * MR, p),
                            grows,
                            cols,
                            accumulate || !first,
                            bias,
                            sink.store(g * MR, p, end),
                        )
                    };
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{MR, NR};
    use half::bf16;
    use std::arch::x86_64::*;

    /// `c[0..rows, 0..cols] (+)= Σ_t a_t · b_t (+ bias)` over the taps t: row r's pair q of a_t is
    /// the word at `a[t] + off + r rs + q ps` (read for r < rows only; rows beyond repeat the
    /// last), b_t is qc rows of 32 pairs from `b[t]`; the sums stored as `store` says
    /// ([`super::super::rows32::store`]).
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available; `a` and `b` of the same length. For every tap, `a[t]` is
    /// valid for unaligned reads of the words at `off + r rs + q ps` for r < rows (>= 1), q < qc;
    /// `b[t]` for qc x 64 bf16, each row 64-byte aligned (aligned vector loads); `c` for reads
    /// (when `load`) and writes (without a bf16 tile) of `rows` (<= MR) rows of `cols` (<= 32)
    /// floats at stride ldc, at any alignment (masked unaligned access); a bf16 tile of `store`
    /// likewise for writes of bf16 at its stride; `bias` is null or valid for `cols` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn run(
        (a, off): (&[*const u32], usize),
        (rs, ps): (usize, usize),
        b: &[*const bf16],
        qc: usize,
        (c, ldc): (*mut f32, usize),
        rows: usize,
        cols: usize,
        load: bool,
        bias: *const f32,
        store: super::super::Store,
    ) {
        // SAFETY: every pointer below stays inside the extents the caller vouches for (see
        // # Safety: row indices are capped at rows - 1); the masks keep loads and stores of c and
        // bias within `cols` columns. The transmutes reinterpret 512 bits as 32 bf16, which is
        // what the vectors hold.
        unsafe {
            let (m0, m1) = super::super::rows32::masks(cols);
            let mut acc = super::super::rows32::start::<MR>(load, rows, c, ldc);
            let last = rows.max(1) - 1;
            for (&a, &b) in a.iter().zip(b) {
                let row: [*const u32; MR] = std::array::from_fn(|r| a.add(off + r.min(last) * rs));
                acc = tap(acc, &row, ps, b, qc);
            }
            let masks = (m0, m1);
            super::super::rows32::store(&mut acc, rows, (c, ldc), masks, bias, load, store);
        }
    }

    /// `acc` plus one tap's products: pair q of row r is the word at `row[r] + q ps`, B's pair
    /// row q the 64 bf16 at `b + 64 q`. (By value, so that the accumulators stay in registers.)
    ///
    /// # Safety
    /// As [`run`]'s, for this tap.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tap(
        mut acc: [[__m512; 2]; MR],
        row: &[*const u32; MR],
        ps: usize,
        b: *const bf16,
        qc: usize,
    ) -> [[__m512; 2]; MR] {
        // SAFETY: as `run`'s.
        unsafe {
            for q in 0..qc {
                let bq = b.add(q * 2 * NR) as *const __m512i;
                let b0: __m512bh = std::mem::transmute(_mm512_load_si512(bq));
                let b1: __m512bh = std::mem::transmute(_mm512_load_si512(bq.add(1)));
                for (acc, &ar) in acc.iter_mut().zip(row) {
                    let word = ar.add(q * ps).read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
        }
        acc
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    /// # Safety
    /// Never called: [`super::available`] is false off x86_64.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        _: (&[*const u32], usize),
        _: (usize, usize),
        _: &[*const half::bf16],
        _: usize,
        _: (*mut f32, usize),
        _: usize,
        _: usize,
        _: bool,
        _: *const f32,
        _: super::super::Store,
    ) {
        unreachable!("AVX512-BF16 exists only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, mut seed: u64) -> Vec<bf16> {
        crate::cpu::lcg_uniform(len, &mut seed, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// Odd shapes: partial row groups, partial panels, odd k, k over several blocks and k = 0; the
    /// last two large enough that A is copied into micro-panels (transposed in registers for an
    /// even row stride, element by element for an odd one or an odd k).
    const SHAPES: [(usize, usize, usize); 11] = [
        (1, 1, 1),
        (9, 2 * KC + 77, 40),
        (5, 70, 33),
        (300, 96, 700),
        (37, 1001, 65),
        (13, 600, 16),
        (145, 257, 64),
        (4, 0, 9),
        (2, 1537, 3),
        (300, 1000, 1100),
        (300, 1001, 300),
    ];

    /// The vectorised packings (keys' and weights' rows transposed as words, values' row pairs
    /// interleaved) equal the element-by-element one, bit for bit, for partial panels, odd k (the
    /// values' zero row) and attention's sizes.
    #[test]
    fn vectorised_packing_equals_element_by_element() {
        if !crate::cpu::test_has("avx512_bf16") {
            return;
        }
        for (n, k) in [
            (1, 2),
            (5, 3),
            (33, 64),
            (1357, 64),
            (64, 1357),
            (70, 96),
            (31, 131),
        ] {
            let w = random(n * k, 7);
            let bits = |p: &PackedPairs| p.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let slow = PackedPairs::fill(k, n, |c, kk| w[c * k + kk]);
            assert_eq!(
                bits(&PackedPairs::from_nk(&w, n, k)),
                bits(&slow),
                "nk {n}x{k}"
            );
            let slow = PackedPairs::fill(k, n, |c, kk| w[kk * n + c]);
            assert_eq!(
                bits(&PackedPairs::from_kn(&w, k, n)),
                bits(&slow),
                "kn {k}x{n}"
            );
        }
    }

    /// Packing f32 rows rounded as it goes equals packing the weight rounded whole, bit for bit,
    /// every row handed back once ([`crate::cpu::check_rounded_packing`]).
    #[test]
    fn packing_rounded_rows_equals_packing_the_rounded_weight() {
        let bits = |p: PackedPairs| p.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        crate::cpu::check_rounded_packing(
            |w, n, k| bits(PackedPairs::from_nk(w, n, k)),
            |w, n, k, done| bits(PackedPairs::from_nk_rounded(w, n, k, done)),
        );
    }

    /// Odd shapes, strided rows (A copied and read in place), bias, parallel and serial, and a sum
    /// of two taps (tap by tap, and in one pass where A is read in place): equal to an f64
    /// reference of the same bf16 values within f32 summation error.
    #[test]
    fn dpbf16_equals_the_reference() {
        if !crate::cpu::test_has("avx512_bf16") {
            return;
        }
        // An odd row stride makes A be copied; an even one (with even k) read in place.
        for (&(m, k, n), extra) in SHAPES.iter().flat_map(|s| [(s, 3), (s, 4)]) {
            let (lda, ldo) = (k + extra, n + 5);
            let a = random(m * lda + 1, 1);
            let w = random(n * k, 2);
            let w2 = random(n * k, 4);
            let bias: Vec<f32> = random(n, 3).iter().map(|v| v.to_f32()).collect();
            let f = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
            let want = crate::cpu::reference_product(&f(&a), m, lda, &f(&w), n, k);
            let want2 = crate::cpu::reference_product(&f(&a[1..]), m, lda, &f(&w2), n, k);
            let (packed, packed2) = (
                PackedPairs::from_nk(&w, n, k),
                PackedPairs::from_nk(&w2, n, k),
            );
            let tol = 1e-6 * (k as f64).sqrt() + 1e-7;
            let mut got = vec![f32::NAN; m * ldo];
            matmul(&a, m, lda, &packed, Some(&bias), &mut got, ldo);
            let mut serial = vec![f32::NAN; m * ldo];
            matmul_serial(&a, m, lda, &packed, &mut serial, ldo);
            let mut taps = vec![f32::NAN; m * ldo];
            let both = [packed.clone(), packed2];
            matmul_taps(&a, &[0, 1], m, lda, &both, Some(&bias), &mut taps, ldo);
            for i in 0..m {
                for j in 0..n {
                    let (g, s) = (got[i * ldo + j], serial[i * ldo + j]);
                    let t = taps[i * ldo + j] - bias[j];
                    let w = want[i * n + j];
                    // (Summation error grows with the sums too: long k reaches |w| ~ 20.)
                    let tol = tol + 2e-6 * w.abs();
                    assert!(
                        (g as f64 - bias[j] as f64 - w).abs() <= tol,
                        "{m}x{k}x{n} [{i},{j}]: {} vs {w}",
                        g - bias[j]
                    );
                    assert!(
                        (s as f64 - w).abs() <= tol,
                        "{m}x{k}x{n}: serial {s} vs {w}"
                    );
                    let w2 = w + want2[i * n + j];
                    let tol2 = 2.0 * tol + 2e-6 * w2.abs();
                    assert!(
                        (t as f64 - w2).abs() <= tol2,
                        "{m}x{k}x{n}: taps {t} vs {w2}"
                    );
                }
                // The padding between rows is not written.
                assert!(got[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()));
            }
            // bf16 out: the f32 result rounded, and the bf16 GELU of that, bit for bit (the
            // padding between rows untouched).
            let mut plain = vec![f32::NAN; m * ldo];
            matmul(&a, m, lda, &packed, Some(&bias), &mut plain, ldo);
            let rounded: Vec<bf16> = plain.iter().map(|&v| crate::cpu::round_bf16(v)).collect();
            let gelu = crate::cpu::elementwise::gelu_tanh_bf16(
                &candle_core::Tensor::new(&rounded[..], &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap();
            for (want, g) in [(&rounded, false), (&gelu, true)] {
                let nan = bf16::from_bits(0x7fc1);
                let mut got = vec![nan; m * ldo];
                matmul_bf16(&a, m, lda, &packed, Some(&bias), &mut got, ldo, g);
                // Into a new vector, written once: the same values.
                let fresh = matmul_bf16_vec(&a, m, lda, &packed, Some(&bias), g);
                assert_eq!(fresh.len(), m * n);
                for i in 0..m {
                    let row = |v: &[bf16], ld: usize| -> Vec<u16> {
                        v[i * ld..i * ld + n].iter().map(|v| v.to_bits()).collect()
                    };
                    let (got, want) = (row(&fresh, n), row(want, ldo));
                    assert_eq!(got, want, "{m}x{k}x{n} (gelu {g}), new vector, row {i}");
                }
                for i in 0..m {
                    let row = |v: &[bf16]| {
                        v[i * ldo..i * ldo + n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(row(&got), row(want), "{m}x{k}x{n} bf16 (gelu {g}), row {i}");
                    let pad = &got[i * ldo + n..((i + 1) * ldo).min(got.len())];
                    assert!(pad.iter().all(|v| v.to_bits() == 0x7fc1), "padding written");
                }
            }
            let bt = crate::cpu::transpose(&w, n, k);
            assert_eq!(&PackedPairs::from_kn(&bt, k, n).data[..], &packed.data[..]);
        }
    }
}
