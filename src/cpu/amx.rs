//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later), for the CPU bf16 path.
//!
//! `C = A · B (+ bias)` with A (m x k) bf16 row-major, B pre-packed once into AMX's VNNI tile layout,
//! products accumulated in f32 over the whole of k and rounded once into the output (f32 or bf16),
//! as PyTorch's oneDNN bf16 products do. Blocking is GotoBLAS-style: the rows of A are taken in chunks
//! copied into a zero-padded buffer, k in blocks, n in panels, with a 32 x 32 micro-kernel that holds
//! four accumulator tiles, two A tiles and two B tiles.
//!
//! [`available`] says whether the CPU has AMX-BF16 and the OS granted this process the tile state
//! (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`), unless `MMDIT_AMX=0` turned it off
//! ([`super::features`]). Callers fall back to candle's matmul when it is off, and the tests compare
//! the two.

use super::aligned::Aligned;
use super::elementwise;
use super::OutPtr;
use half::bf16;
use rayon::prelude::*;

/// Rows of A per task (copied into a padded buffer), k per block, n per panel.
const MC: usize = 256;
const KC: usize = 2048;
const NC: usize = 256;

/// Whether AMX bf16 tiles can be used in this process (the feature switch, [`super::features`]).
pub fn available() -> bool {
    super::features().amx
}

/// The right-hand operand B (k x n) packed into 16 x 32 bf16 tiles: for each 32-column block of n
/// and each 32-row block of k, two tiles (columns 0..16, 16..32), each 16 rows of k-pairs:
/// `tile[r][2c + p] = B[32 kb + 2r + p][16 t + c]`. k and n are zero-padded to multiples of 32.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    kp: usize,
    np: usize,
    data: Aligned<bf16>,
}

impl PackedB {
    /// From B given transposed, as a (n x k) row-major matrix (a linear layer's weight).
    pub fn from_nk(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        Self::pack(k, n, |kk, nn| w[nn * k + kk])
    }

    /// From B as a (k x n) row-major matrix.
    pub fn from_kn(b: &[bf16], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "matrix is not {k} x {n}");
        Self::pack(k, n, |kk, nn| b[kk * n + nn])
    }

    /// [`Self::from_nk`] of `w` rounded to bf16 (nearest even, as [`super::rounded_to_bf16`]
    /// rounds), in runs of 32-column blocks (16 MiB of w), each run's rows then passed to `done`:
    /// no bf16 copy of the whole weight beside the tiles, and a file's f32 pages released as they
    /// are packed.
    pub fn from_nk_rounded(w: &[f32], n: usize, k: usize, done: impl Fn(&[f32])) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        let (kp, np) = (k.next_multiple_of(32), n.next_multiple_of(32));
        let mut data = Aligned::zeroed(kp * np);
        let at = |kk: usize, nn: usize| super::round_bf16(w[nn * k + kk]);
        super::pack_in_runs(
            &mut data,
            ((kp / 32) * 1024, 32),
            w,
            (n, k),
            done,
            |nb, dst| Self::pack_panel(k, n, nb, dst, &at),
        );
        Self { k, n, kp, np, data }
    }

    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> bf16 + Sync) -> Self {
        let (kp, np) = (k.next_multiple_of(32), n.next_multiple_of(32));
        let mut data = Aligned::zeroed(kp * np);
        let kbs = kp / 32;
        data.par_chunks_mut(kbs * 1024)
            .enumerate()
            .for_each(|(nb, panel)| Self::pack_panel(k, n, nb, panel, &at));
        Self { k, n, kp, np, data }
    }

    /// The tiles of 32-column block `nb` into `panel` (zeroed): `at(k, column)` for those below k
    /// and n.
    fn pack_panel(
        k: usize,
        n: usize,
        nb: usize,
        panel: &mut [bf16],
        at: &(impl Fn(usize, usize) -> bf16 + Sync),
    ) {
        for kb in 0..panel.len() / 1024 {
            for t in 0..2 {
                for c in 0..16 {
                    let nn = nb * 32 + t * 16 + c;
                    if nn >= n {
                        continue;
                    }
                    for r in 0..16 {
                        for p in 0..2 {
                            let kk = kb * 32 + 2 * r + p;
                            if kk < k {
                                panel[kb * 1024 + t * 512 + r * 32 + 2 * c + p] = at(kk, nn);
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// k rounded up to a multiple of 32 (the row length [`matmul_padded`] takes).
    pub fn k_padded(&self) -> usize {
        self.kp
    }

    /// n rounded up to a multiple of 32 (the row length [`matmul_padded`] writes).
    pub fn n_padded(&self) -> usize {
        self.np
    }

    /// Bytes held by the packed copy.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The two tiles (columns 32 nb .. 32 nb + 32) of k-block kb.
    fn tiles(&self, nb: usize, kb: usize) -> *const bf16 {
        let kbs = self.kp / 32;
        self.data[(nb * kbs + kb) * 1024..].as_ptr()
    }
}

/// An element type the product can be written as.
pub trait Output: Copy + Send + Sync {
    /// `o = c`, a row of f32 sums, in this type; with `gelu` through the tanh-GELU: in f32 the
    /// values of [`elementwise::gelu_tanh_f32`] of the sums, in bf16 each sum rounded once and
    /// the GELU of that bf16 value rounded again (a bf16 product followed by
    /// [`elementwise::gelu_tanh_bf16`]). `c` may be overwritten; `e` is scratch of its length.
    fn store(c: &mut [f32], o: &mut [Self], gelu: bool, e: &mut [f32]);

    const ZERO: Self;
}

impl Output for f32 {
    const ZERO: Self = 0.0;

    fn store(c: &mut [f32], o: &mut [f32], gelu: bool, e: &mut [f32]) {
        match gelu {
            true => elementwise::gelu_f32_chunk(c, e, o),
            false => o.copy_from_slice(c),
        }
    }
}

impl Output for bf16 {
    const ZERO: Self = bf16::ZERO;

    fn store(c: &mut [f32], o: &mut [bf16], gelu: bool, e: &mut [f32]) {
        match gelu {
            true => {
                elementwise::through_bf16(c);
                elementwise::gelu_bf16_chunk(c, e, o)
            }
            false => elementwise::round_chunk(c, o),
        }
    }
}

/// `out (m x n, row stride ldo) = a (m x k, row stride lda) · b (+ bias)`, on the rayon pool.
/// Panics if [`available`] is false or the slices are too short for the shapes.
#[allow(clippy::too_many_arguments)]
pub fn matmul<O: Output>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: &mut [O],
    ldo: usize,
) {
    into_slice(a, m, lda, b, bias, out, ldo, false)
}

/// [`matmul`] through the tanh-GELU as each row is written ([`Output::store`]): the values of
/// [`matmul`] followed by the GELU pass of the output's type, without that pass.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu<O: Output>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: &mut [O],
    ldo: usize,
) {
    into_slice(a, m, lda, b, bias, out, ldo, true)
}

#[allow(clippy::too_many_arguments)]
fn into_slice<O: Output>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: &mut [O],
    ldo: usize,
    gelu: bool,
) {
    let fits = m == 0 || out.len() >= (m - 1) * ldo + b.n;
    assert!(fits, "output is too short");
    // SAFETY: out holds the m rows at stride ldo (asserted).
    unsafe { product(a, m, lda, b, bias, out.as_mut_ptr(), ldo, gelu) }
}

/// [`matmul`] (or with `gelu` [`matmul_gelu`]) into a new (m x n) row-major vector, written once:
/// without the pass that zeroes a vector first (on the calling thread alone: 3% of a bf16 step's
/// samples in `perf`).
pub fn matmul_vec<O: Output>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Vec<O> {
    let len = m * b.n;
    let mut out = Vec::with_capacity(len);
    // SAFETY: out's buffer holds len = m x n values; the product writes every one of them (its
    // tasks partition the rows and the column panels) before set_len makes them readable, and on
    // a panic out is dropped with length 0.
    unsafe {
        product(a, m, lda, b, bias, out.as_mut_ptr(), b.n, gelu);
        out.set_len(len);
    }
    out
}

/// The products above, into `out`, on the rayon pool.
///
/// # Safety
/// `out` is valid for writes of m rows of n values at row stride ldo (it may be uninitialised:
/// it is only written), and nothing else touches them while the call runs.
#[allow(clippy::too_many_arguments)]
unsafe fn product<O: Output>(
    a: &[bf16],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: *mut O,
    ldo: usize,
    gelu: bool,
) {
    assert!(available(), "AMX matmul called where AMX is not available");
    let (k, n) = (b.k, b.n);
    assert!(lda >= k && ldo >= n, "row strides shorter than the rows");
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "A is too short");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bias length");
    }
    let optr = OutPtr(out);
    let tasks = super::split_tasks(m, MC, 32, b.np / 32);
    // Where tasks share a chunk of rows (few rows, the columns split between threads), each would
    // copy the chunk: they read it in place instead (T5-XXL's 512 rows: text-bench's bf16 text
    // phase 0.384-0.397 -> 0.369-0.372 s, min of five, three alternations). Where each chunk has
    // one task, its copy stays (reading in place there ran the transformers' steps 12-15% slower).
    let shared = tasks.windows(2).any(|w| w[0].0 == w[1].0);
    tasks.par_iter().for_each(|&(row0, rows, nb_lo, nb_hi)| {
        let block = Block {
            rows: (row0, rows),
            panels: (nb_lo, nb_hi),
            bias,
            gelu,
        };
        // SAFETY: AMX is available (asserted); a holds the shapes (asserted), out the output's
        // (the caller's contract); the task's rows x columns block of the output is written by no
        // other task (split_tasks).
        unsafe { task((a, lda, shared), b, block, optr.get(), ldo) };
    });
}

/// One task's part of a product: its rows (first, count) and column panels (of 32), and how its
/// sums are written.
#[derive(Clone, Copy)]
struct Block<'a> {
    rows: (usize, usize),
    panels: (usize, usize),
    bias: Option<&'a [f32]>,
    gelu: bool,
}

/// `c (mrows x n_padded, f32) = a (mrows x k_padded, bf16) · b`, on the calling thread, with no
/// copies: for callers that keep their operands in the padded layout (mrows a multiple of 32, the
/// padding columns of a zero; c's values are not read).
pub fn matmul_padded(a: &[bf16], mrows: usize, b: &PackedB, c: &mut [f32]) {
    assert!(available(), "AMX matmul called where AMX is not available");
    assert!(mrows.is_multiple_of(32), "rows not a multiple of 32");
    assert_eq!(a.len(), mrows * b.kp, "A is not rows x k_padded");
    assert_eq!(c.len(), mrows * b.np, "C is not rows x n_padded");
    // SAFETY: AMX is available; a, b and c hold the padded shapes (asserted above).
    unsafe { kernel::run(a, (mrows, b.kp, b.kp), b, 0, b.np / 32, c, b.np, true) };
}

/// Whether rows of bf16 A `stride` values apart fall into the same cache sets: at a multiple of
/// 4 KiB the 16 rows of a tile share one set of L1 (12 ways), and a 256-row chunk fills every way
/// of L2's sets with A alone, so that A and B evict each other. T5-XXL's k = 4096 and 10240 are
/// such strides; their rows are copied one cache line apart instead.
fn aliased(stride: usize) -> bool {
    (stride * size_of::<bf16>()).is_multiple_of(4096)
}

/// One (row chunk, column range): pad the rows of A (or, with `in_place`, where they need no
/// padding, read them where they lie), accumulate the f32 block, write it out.
///
/// # Safety
/// AMX must be available. `a` holds the block's rows `row0 .. row0 + rows` at stride `lda` (each
/// `b.k` long); `out` is valid for writes of those rows at stride `ldo`, columns
/// `32 nb_lo .. min(32 nb_hi, n)`, and no other thread touches that block while the call runs.
/// (No alignment is needed: tiles are loaded at any alignment, and the output is written with
/// unaligned stores.)
unsafe fn task<O: Output>(
    (a, lda, in_place): (&[bf16], usize, bool),
    b: &PackedB,
    block: Block,
    out: *mut O,
    ldo: usize,
) {
    let ((row0, rows), (nb_lo, nb_hi)) = (block.rows, block.panels);
    let (k, kp) = (b.k, b.kp);
    let mrows = rows.next_multiple_of(32);
    SCRATCH.with(|scratch| {
        let (ap, c) = &mut *scratch.borrow_mut();
        // Whole tiles of A where it lies: rows a multiple of 32, k of 32 (then kp == k), at a
        // stride that is no multiple of 4 KiB.
        let (at, lda) = if in_place && rows == mrows && k == kp && !aliased(lda) {
            (&a[row0 * lda..], lda)
        } else {
            // Reused per thread: fresh multi-megabyte buffers per call cost page faults. Every
            // value is written: the rows, zeros past k (and in the stride's padding) and in the
            // padding rows.
            let ldp = if aliased(kp) { kp + 32 } else { kp };
            ap.resize(mrows * ldp);
            for (r, dst) in ap.chunks_exact_mut(ldp).enumerate() {
                let (head, tail) = dst.split_at_mut(k.min(kp));
                match r < rows {
                    true => head.copy_from_slice(&a[(row0 + r) * lda..][..k]),
                    false => head.fill(bf16::ZERO),
                }
                tail.fill(bf16::ZERO);
            }
            (&ap[..], ldp)
        };
        // One column panel at a time, so its f32 accumulators stay in cache through all of k.
        let ncb = NC / 32;
        for p_lo in (nb_lo..nb_hi).step_by(ncb) {
            let p_hi = (p_lo + ncb).min(nb_hi);
            let width = (p_hi - p_lo) * 32;
            c.resize(mrows * width);
            // SAFETY: AMX is available (the caller's contract); `at` holds mrows rows of kp at
            // stride lda >= kp (the padded copy, or the caller's rows, which hold (rows - 1) lda +
            // k values past row0 with rows == mrows and k == kp), c mrows x width, both in tile
            // multiples.
            unsafe { kernel::run(at, (mrows, kp, lda), b, p_lo, p_hi, c, width, true) };
            let col0 = p_lo * 32;
            let cols = (b.n.min(p_hi * 32)).saturating_sub(col0);
            // SAFETY: rows row0 .. row0 + rows, columns col0 .. col0 + cols of out are this
            // task's (the caller's contract); c holds rows x width with width >= cols.
            unsafe { write_block(c, width, (rows, cols), block, out, (row0, col0), ldo) };
        }
    });
}

/// `out (m x n, row stride ldo) = Σ_t a[offsets[t]..] · bs[t] (+ bias)`, on the rayon pool: a
/// convolution's taps ([`super::conv`]), each tap's left operand the rows of `a` at row stride k
/// (the taps' common k, a multiple of 32) from its offset, summed in one f32 block and written once.
/// Past each offset `a` holds m rounded up to 32 rows: the rows past m feed only output rows that
/// are not written. Panics if AMX is not available or the shapes do not hold.
pub fn matmul_taps(
    a: &[bf16],
    offsets: &[usize],
    m: usize,
    bs: &[PackedB],
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(available(), "AMX matmul called where AMX is not available");
    assert_eq!(offsets.len(), bs.len(), "one offset per tap");
    let Some(first) = bs.first() else {
        panic!("a convolution without taps")
    };
    let (k, n, np) = (first.k, first.n, first.np);
    assert!(k.is_multiple_of(32), "k is not a multiple of 32");
    assert!(
        bs.iter().all(|b| (b.k, b.n) == (k, n)),
        "taps of different shapes"
    );
    assert!(ldo >= n, "row stride shorter than the rows");
    if m == 0 || n == 0 {
        return;
    }
    let mrows = m.next_multiple_of(32);
    assert!(
        offsets.iter().all(|&o| a.len() >= o + mrows * k),
        "A is too short for its taps"
    );
    assert!(out.len() >= (m - 1) * ldo + n, "output is too short");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bias length");
    }
    let optr = OutPtr(out.as_mut_ptr());
    // Row chunks start at multiples of 32 (the granule), so each chunk's padded rows stay inside
    // the mrows rows asserted above.
    let tasks = super::split_tasks(m, MC, 32, np / 32);
    tasks.par_iter().for_each(|&(row0, rows, nb_lo, nb_hi)| {
        let trows = rows.next_multiple_of(32);
        SCRATCH.with(|scratch| {
            let (_, c) = &mut *scratch.borrow_mut();
            let ncb = NC / 32;
            for p_lo in (nb_lo..nb_hi).step_by(ncb) {
                let p_hi = (p_lo + ncb).min(nb_hi);
                let width = (p_hi - p_lo) * 32;
                c.resize(trows * width);
                for (t, (&offset, b)) in offsets.iter().zip(bs).enumerate() {
                    let at = &a[offset + row0 * k..][..trows * k];
                    // SAFETY: AMX is available (asserted); `at` is trows x k with trows and k
                    // multiples of 32 (k == b.kp), c trows x width; b has p_hi <= np / 32 blocks.
                    // The first tap sets c, the others add to it.
                    unsafe { kernel::run(at, (trows, k, k), b, p_lo, p_hi, c, width, t == 0) };
                }
                let col0 = p_lo * 32;
                let cols = n.min(p_hi * 32).saturating_sub(col0);
                let block = Block {
                    rows: (row0, rows),
                    panels: (p_lo, p_hi),
                    bias,
                    gelu: false,
                };
                // SAFETY: the task's rows x columns block of out is written by no other task
                // (split_tasks), inside out (asserted); c holds trows x width.
                unsafe {
                    write_block(c, width, (rows, cols), block, optr.get(), (row0, col0), ldo)
                };
            }
        });
    });
}

/// Rows x cols of the f32 block `c` (row stride width), plus the bias's columns col0 .., into out
/// from (row0, col0) at row stride ldo ([`Output::store`], through the GELU with `block.gelu`;
/// `c` is overwritten on the way). At most [`NC`] columns.
///
/// # Safety
/// `out` is valid for writes of that block (which may be uninitialised: each row is copied in from
/// a finished row on the stack, never read), which no other thread touches while the call runs;
/// `c` holds rows rows of width >= cols values; the bias (if any) holds col0 + cols values.
unsafe fn write_block<O: Output>(
    c: &mut [f32],
    width: usize,
    (rows, cols): (usize, usize),
    block: Block,
    out: *mut O,
    (row0, col0): (usize, usize),
    ldo: usize,
) {
    assert!(cols <= NC, "a block wider than a panel");
    let (mut e, mut o) = ([0f32; NC], [O::ZERO; NC]);
    for r in 0..rows {
        let crow = &mut c[r * width..r * width + cols];
        if let Some(bias) = block.bias {
            add_bias(crow, &bias[col0..col0 + cols]);
        }
        O::store(crow, &mut o[..cols], block.gelu, &mut e[..cols]);
        // SAFETY: row row0 + r, columns col0 .. col0 + cols of out are the caller's to write, and
        // no other thread touches them; o is a separate stack array of cols <= NC values.
        unsafe {
            std::ptr::copy_nonoverlapping(o.as_ptr(), out.add((row0 + r) * ldo + col0), cols)
        };
    }
}

super::vector_dispatch!(add_bias, add_bias_generic, (c: &mut [f32], bias: &[f32]));

#[inline(always)]
fn add_bias_generic(c: &mut [f32], bias: &[f32]) {
    for (v, b) in c.iter_mut().zip(bias) {
        *v += b;
    }
}

thread_local! {
    /// Per-thread padded rows of A and f32 accumulators of [`task`].
    static SCRATCH: std::cell::RefCell<(Aligned<bf16>, Aligned<f32>)> = const {
        std::cell::RefCell::new((Aligned::new(), Aligned::new()))
    };
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{PackedB, KC, NC};
    use half::bf16;
    use std::arch::asm;

    /// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Asks for the 64-byte line at `p` in L2 (a hint: it neither faults nor changes memory).
    #[inline(always)]
    fn prefetch_l2(p: *const i8) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: prefetcht1 reads nothing into the program and never faults, whatever `p` is
        // (SSE, part of x86_64's baseline).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p) }
    }

    /// `c (mrows x width f32) += ap (mrows x kp, row stride lda) · b[:, 32 nb_lo .. 32 nb_hi]`, or
    /// with `zero` `c = ...` (c's values are not read: the accumulators start at zero).
    ///
    /// # Safety
    /// AMX must be available and permitted (see [`super::available`]). mrows and kp are multiples
    /// of 32, lda >= kp; `ap` holds mrows rows of kp elements at stride lda (the last row need
    /// not extend to a full stride), `c` mrows x width with width >= 32 (nb_hi - nb_lo),
    /// and `b` has at least nb_hi column blocks and kp / 32 k-blocks. Tile rows are read and written
    /// at any alignment (tileloadd/tilestored do not require one; 64-byte alignment only makes them
    /// faster).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        ap: &[bf16],
        (mrows, kp, lda): (usize, usize, usize),
        b: &PackedB,
        nb_lo: usize,
        nb_hi: usize,
        c: &mut [f32],
        width: usize,
        zero: bool,
    ) {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: AMX is available (the caller's contract), so the tile instructions exist and
        // the tile state is granted. Every pointer stays inside its buffer: a0/a1 point at row
        // blocks 32 mb and 32 mb + 16 (< mrows) of ap, read 16 rows of 64 bytes at stride 2 lda from
        // column 32 kb < kp; c0..c3 are the four 16 x 16 quarters of the 32 x 32 block (mb, nb -
        // nb_lo) of c, rows < mrows and columns < 32 (nb_hi - nb_lo) <= width; b.tiles(nb, kb) is a
        // pair of 16 x 32 tiles inside b's data (nb < nb_hi, kb < kp / 32), and so are the lines
        // prefetched from the next block's pair (2 KiB at nb + 1 < np / 32, kb; lines < 32 of 64
        // bytes). Only tilestored writes memory, into c, which this call holds mutably.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
            let row = lda; // elements
            let lda = (lda * 2) as isize; // bytes
            let ldc = (width * 4) as isize;
            let kbs = kp / 32;
            // k in equal blocks of at most KC: C is loaded and stored once per block.
            let kcb = kbs.div_ceil(kbs.div_ceil(KC / 32)).max(1);
            let ncb = NC / 32;
            for kb0 in (0..kbs).step_by(kcb) {
                let kb1 = (kb0 + kcb).min(kbs);
                for nbp in (nb_lo..nb_hi).step_by(ncb) {
                    let nbp1 = (nbp + ncb).min(nb_hi);
                    // Each 32-column block of B through every row block of the chunk (B's
                    // block read from near caches, the chunk's rows from L2): on a 2-core Xeon
                    // 5-10% faster than the rows outside, and whole k blocks up to 2048 another
                    // 10-15% on k = 1536 (gemm_bench).
                    //
                    // While a column block goes through the row blocks, the next block's B (32
                    // lines of 64 bytes per k-block) is prefetched into L2, its lines spread over
                    // the row blocks, so that it arrives from memory while the tiles work instead
                    // of when they first load it: 5-15% on gemm_bench's shapes with the weights
                    // read from memory (`COLD=1`), 7-10% of sd3-bench's and flux-bench's bf16 step.
                    let mbs = mrows / 32;
                    let per = 32usize.div_ceil(mbs);
                    for nb in nbp..nbp1 {
                        // The next column block, if b has one (the first of the next panel or
                        // call included).
                        let next = (nb + 1 < b.np / 32).then(|| b.tiles(nb + 1, 0));
                        for mb in 0..mbs {
                            let lines = (mb * per).min(32)..((mb + 1) * per).min(32);
                            let a0 = ap.as_ptr().add(mb * 32 * row);
                            let a1 = a0.add(16 * row);
                            let c0 = c.as_mut_ptr().add(mb * 32 * width + (nb - nb_lo) * 32);
                            let c1 = c0.add(16);
                            let c2 = c0.add(16 * width);
                            let c3 = c2.add(16);
                            if zero && kb0 == 0 {
                                asm!(
                                    "tilezero tmm0",
                                    "tilezero tmm1",
                                    "tilezero tmm2",
                                    "tilezero tmm3",
                                    options(nostack, nomem),
                                );
                            } else {
                                asm!(
                                    "tileloadd tmm0, [{c0} + {ldc}*1]",
                                    "tileloadd tmm1, [{c1} + {ldc}*1]",
                                    "tileloadd tmm2, [{c2} + {ldc}*1]",
                                    "tileloadd tmm3, [{c3} + {ldc}*1]",
                                    c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2,
                                    c3 = in(reg) c3, ldc = in(reg) ldc, options(nostack, readonly),
                                );
                            }
                            for kb in kb0..kb1 {
                                let bt = b.tiles(nb, kb);
                                if let Some(next) = next {
                                    // k-block kb of the next column block (contiguous blocks).
                                    let tiles = next.add(kb * 1024) as *const i8;
                                    for line in lines.clone() {
                                        prefetch_l2(tiles.add(line * 64));
                                    }
                                }
                                asm!(
                                    "tileloadd tmm4, [{a0} + {lda}*1]",
                                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                                    "tileloadd tmm5, [{a1} + {lda}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    a0 = in(reg) a0.add(kb * 32),
                                    a1 = in(reg) a1.add(kb * 32),
                                    b0 = in(reg) bt,
                                    b1 = in(reg) bt.add(512),
                                    lda = in(reg) lda,
                                    ldb = in(reg) 64isize,
                                    options(nostack, readonly),
                                );
                            }
                            asm!(
                                "tilestored [{c0} + {ldc}*1], tmm0",
                                "tilestored [{c1} + {ldc}*1], tmm1",
                                "tilestored [{c2} + {ldc}*1], tmm2",
                                "tilestored [{c3} + {ldc}*1], tmm3",
                                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                                ldc = in(reg) ldc, options(nostack),
                            );
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::PackedB;
    use half::bf16;

    /// # Safety
    /// Never called: [`super::available`] is false off x86_64.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        _: &[bf16],
        _: (usize, usize, usize),
        _: &PackedB,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX exists only on x86_64")
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

    /// Packing f32 rows rounded as it goes equals packing the weight rounded whole, bit for bit,
    /// every row handed back once ([`crate::cpu::check_rounded_packing`]). (Packing needs no AMX:
    /// this runs on every CPU.)
    #[test]
    fn packing_rounded_rows_equals_packing_the_rounded_weight() {
        let bits = |p: PackedB| p.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        crate::cpu::check_rounded_packing(
            |w, n, k| bits(PackedB::from_nk(w, n, k)),
            |w, n, k, done| bits(PackedB::from_nk_rounded(w, n, k, done)),
        );
    }

    /// Rows read in place (tasks sharing a chunk of whole tiles: 64 or 512 rows, k a multiple of
    /// 32, A at a wider row stride) give the values of the same rows copied (one more row, so the
    /// chunk's last tile is padded and copied), bit for bit.
    #[test]
    fn rows_read_in_place_equal_rows_copied() {
        if !crate::cpu::test_has("amx") {
            return;
        }
        for &(m, k, n, lda) in &[
            (64, 96, 200, 96),
            (64, 2080, 70, 2100),
            (512, 128, 4096, 160),
            // A stride of 4 KiB: copied a line apart, not read in place.
            (512, 2048, 300, 2048),
        ] {
            let a = random((m + 1) * lda, 4);
            let w = random(n * k, 5);
            let packed = PackedB::from_nk(&w, n, k);
            let tasks = crate::cpu::split_tasks(m, MC, 32, packed.np / 32);
            if !tasks.windows(2).any(|w| w[0].0 == w[1].0) {
                continue; // one thread: every chunk has one task, nothing is read in place
            }
            let (mut in_place, mut copied) = (vec![0f32; m * n], vec![0f32; (m + 1) * n]);
            matmul(&a, m, lda, &packed, None, &mut in_place, n);
            matmul(&a, m + 1, lda, &packed, None, &mut copied, n);
            assert!(in_place == copied[..m * n], "{m}x{k}x{n}: in place differs");
        }
    }

    /// Odd shapes (padding in m, n and k), several tasks, bias, both output types: equal to an f64
    /// reference within f32 accumulation error (f32 out) and one bf16 rounding (bf16 out).
    #[test]
    fn amx_matmul_equals_the_reference() {
        if !crate::cpu::test_has("amx") {
            return;
        }
        for &(m, k, n) in &[
            (1, 32, 32),
            (5, 70, 33),
            (300, 96, 700),
            (37, 1000, 65),
            (64, 64, 64),
            // k in two blocks of KC (the accumulators stored and loaded between them).
            (40, 2100, 70),
            // Rows 4 KiB and 8 KiB apart: copied at a stride one line longer.
            (70, 2048, 40),
            (40, 4096, 70),
        ] {
            let a = random(m * k, 1);
            let w = random(n * k, 2);
            let bias: Vec<f32> = random(n, 3).iter().map(|v| v.to_f32()).collect();
            let f = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
            let want: Vec<f32> = crate::cpu::reference_product(&f(&a), m, k, &f(&w), n, k)
                .iter()
                .enumerate()
                .map(|(i, &s)| s as f32 + bias[i % n])
                .collect();
            let packed = PackedB::from_nk(&w, n, k);
            let mut got = vec![0f32; m * n];
            matmul(&a, m, k, &packed, Some(&bias), &mut got, n);
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-4 * (k as f32).sqrt(),
                "{m}x{k}x{n}: f32 error {err}"
            );
            let mut got16 = vec![bf16::ZERO; m * n];
            matmul(&a, m, k, &packed, Some(&bias), &mut got16, n);
            for (g, w) in got16.iter().zip(&want) {
                let tol = w.abs() * 2f32.powi(-8) + 1e-4 * (k as f32).sqrt();
                assert!(
                    (g.to_f32() - w).abs() <= tol,
                    "{m}x{k}x{n}: bf16 {g} vs {w}"
                );
            }
            // Through the GELU as it is written: the product, then the GELU pass of its type.
            let mut g = vec![0f32; m * n];
            matmul_gelu(&a, m, k, &packed, Some(&bias), &mut g, n);
            let t =
                |v: Vec<f32>| candle_core::Tensor::from_vec(v, m * n, &candle_core::Device::Cpu);
            let want = elementwise::gelu_tanh_f32(&t(got.clone()).unwrap()).unwrap();
            assert_eq!(g, want.to_vec1::<f32>().unwrap(), "{m}x{k}x{n}: f32 GELU");
            let mut g16 = vec![bf16::ZERO; m * n];
            matmul_gelu(&a, m, k, &packed, Some(&bias), &mut g16, n);
            let t16 =
                candle_core::Tensor::from_vec(got16.clone(), m * n, &candle_core::Device::Cpu);
            let want = elementwise::gelu_tanh_bf16(&t16.unwrap()).unwrap();
            assert_eq!(
                g16,
                want.to_vec1::<bf16>().unwrap(),
                "{m}x{k}x{n}: bf16 GELU"
            );
            // Into a new vector, written once: the same values.
            assert_eq!(
                matmul_vec::<bf16>(&a, m, k, &packed, Some(&bias), false),
                got16
            );
            assert_eq!(
                matmul_vec::<bf16>(&a, m, k, &packed, Some(&bias), true),
                g16
            );
            assert_eq!(matmul_vec::<f32>(&a, m, k, &packed, Some(&bias), true), g);
            // B given as (k x n) packs to the same tiles.
            let bt = crate::cpu::transpose(&w, n, k);
            assert_eq!(&PackedB::from_kn(&bt, k, n).data[..], &packed.data[..]);
        }
    }

    /// Rows of A at a stride longer than k (whole row blocks and a last partial one): the product
    /// of the same rows stored contiguously.
    #[test]
    fn amx_matmul_reads_strided_rows() {
        if !crate::cpu::test_has("amx") {
            return;
        }
        let (k, n, lda) = (96, 40, 130);
        for m in [64, 70, 300] {
            let a = random(m * lda, 4);
            let dense: Vec<bf16> = a.chunks(lda).flat_map(|r| r[..k].to_vec()).collect();
            let packed = PackedB::from_nk(&random(n * k, 5), n, k);
            let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&a, m, lda, &packed, None, &mut got, n);
            matmul(&dense, m, k, &packed, None, &mut want, n);
            assert_eq!(got, want, "m = {m}");
        }
    }
}
