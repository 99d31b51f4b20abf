//! CPU kernels that candle lacks or that are slow there: matrix products on AVX-512 (f32), AMX
//! (bf16) and AVX512-BF16 (bf16 without AMX) with weights packed at load, fused attention, im2col-free convolution, GroupNorm, and
//! vectorised element-wise passes. They work on slices; the layers in `nn` choose them by
//! [`features()`] and wrap them as tensors.
//!
//! Unsafe code here is of three kinds, each with its invariants written where it is used: inline
//! assembly and intrinsics that need a CPU feature (callers check [`features()`]), raw pointers into
//! outputs that parallel tasks write in disjoint parts ([`OutPtr`], tasks from [`split_tasks`]), and
//! the aligned buffer of [`aligned`].

/// Defines `$name(args)` that runs `$generic(args)` compiled for AVX-512 when [`features()`] allows
/// it, else for AVX2 (with FMA, which Rust never contracts into: the same values) when it allows
/// that, else as built (the build targets baseline x86_64: SSE2).
macro_rules! vector_dispatch {
    ($name:ident, $generic:path, ($($arg:ident : $ty:ty),*)) => {
        $crate::cpu::vector_dispatch!($name, $generic, ($($arg: $ty),*) -> ());
    };
    ($name:ident, $generic:path, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU must have AVX-512F.
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                /// # Safety
                /// The CPU must have AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                let f = $crate::cpu::features();
                if f.avx512 {
                    // SAFETY: the feature switch reports AVX-512F only where the CPU has it.
                    return unsafe { wide($($arg),*) };
                }
                if f.avx2 {
                    // SAFETY: the feature switch reports AVX2 only where the CPU has it and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use vector_dispatch;

pub mod aligned;
pub mod amx;
pub mod attention;
pub mod bf16_weight;
pub mod conv;
pub mod dpbf16;
pub mod elementwise;
mod features;

pub mod group_norm;
pub mod heads;
pub mod heap;
pub mod qgemm;
pub mod rope;
pub mod sgemm;
mod transpose;

pub use features::{features, test_has, Features};

/// A new vector of `len` values written in parallel, `chunk` values a task (the last part
/// shorter): `fill(i, part)` writes part i, the values from `i · chunk` on. No pass zeroes the memory
/// first: a `vec![0; len]` whose memory the allocator reuses is a `memset` (with the outputs that
/// are overwritten anyway, 2.7% of a bf16 SD3 step's samples in `perf`).
///
/// # Safety
/// `fill` must write every element of each part it is given: the vector's values are read as
/// initialised once it returns. (If `fill` panics, the vector is dropped with length 0, unread.)
pub(crate) unsafe fn par_written<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| fill(i, part));
    // SAFETY: the capacity holds len values, each written by `fill` (the caller's contract).
    unsafe { v.set_len(len) };
    v
}

/// [`par_written`] for passes that write through `&mut [T]`: each part is handed to `fill(scratch,
/// i, part)` zeroed, cleared by the thread that fills it, in cache, just before; `scratch` is made
/// by `init` once per run of parts a thread takes. Instead of `vec![zero; len]` and then a parallel
/// pass, where the calling thread clears the whole vector (and faults its fresh pages in) while the
/// pool waits: in text-bench's bf16 text phase on a 2-core machine the calling thread's samples
/// (that clearing, its page faults and candle's head copies) were 6.7% of all, 3% after.
pub(crate) fn par_new<T: Copy + Send + Sync, S>(
    len: usize,
    chunk: usize,
    zero: T,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each_init(init, |scratch, (i, part)| {
            part.fill(std::mem::MaybeUninit::new(zero));
            // SAFETY: every value of `part` was written on the line above, so it may be viewed as
            // initialised values of T (MaybeUninit<T> has T's layout).
            let part = unsafe { &mut *(part as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            fill(scratch, i, part)
        });
    // SAFETY: the capacity holds len values, each written (zeroed, then by `fill`) above.
    unsafe { v.set_len(len) };
    v
}

/// The mask of the low `n` (<= 16) lanes of a 16-lane vector: a row's tail for masked loads and
/// stores.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn low_lanes(n: usize) -> std::arch::x86_64::__mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as std::arch::x86_64::__mmask16
}

/// What the 32-column micro-kernels ([`sgemm`], [`dpbf16`], [`qgemm`]) share: an output row is two
/// vectors of 16 f32, `cols` (<= 32) of them written. `start` and `finish` are always inlined into
/// the kernels (and so take their `avx512f`: Rust refuses `inline(always)` on a `target_feature`
/// function), so that the accumulators stay in registers from start to finish; a call between
/// them kept the accumulators in memory, zeroed and reloaded on every kernel call.
#[cfg(target_arch = "x86_64")]
pub(crate) mod rows32 {
    // The GELU is called by name where the rows are stored: passed as a closure or a function
    // value, LLVM left it out of line, compiled without the kernels' AVX-512, and called it for
    // every 16 values.
    use super::elementwise::gelu_tanh16;
    use std::arch::x86_64::*;

    /// The masks of the first and second 16 columns for `cols` (<= 32) columns.
    #[inline(always)]
    pub(crate) fn masks(cols: usize) -> (__mmask16, __mmask16) {
        let lo = if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as u16
        };
        let hi = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            ((1u32 << (cols - 16)) - 1) as u16
        } else {
            0
        };
        (lo, hi)
    }

    /// R zero accumulator rows. With `load`, the first `rows` rows of `c` (stride ldc, 32 columns)
    /// are fetched into the cache meanwhile, for [`finish`] to add: adding c after the products
    /// keeps its cache misses off the chain of FMAs, which loading it first would stall.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    pub(crate) unsafe fn start<const R: usize>(
        load: bool,
        rows: usize,
        c: *const f32,
        ldc: usize,
    ) -> [[__m512; 2]; R] {
        if load {
            for r in 0..rows.min(R) {
                // (A prefetch is only a hint: it never faults, whatever the address.)
                let p = c.wrapping_add(r * ldc) as *const i8;
                // SAFETY: prefetching has no architectural effect.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(p);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(124));
                }
            }
        }
        // SAFETY: AVX-512F is available (# Safety).
        [[unsafe { _mm512_setzero_ps() }; 2]; R]
    }

    /// Adds what the first `rows` rows of `c` hold when `load` and `bias` (unless null) to the
    /// accumulator rows, and stores those rows to `c` at stride ldc, columns masked by `m`.
    ///
    /// # Safety
    /// AVX-512F available; `c` valid for writes (and with `load` reads) of `rows` rows of the
    /// masked columns at stride ldc; `bias` null or valid for reads of the masked columns.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn finish<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        rows: usize,
        c: *mut f32,
        ldc: usize,
        masks: (__mmask16, __mmask16),
        bias: *const f32,
        load: bool,
    ) {
        // SAFETY: the caller's contract is finish_with's.
        unsafe { finish_with(acc, rows, c, ldc, masks, bias, load, false) }
    }

    /// [`finish`] with, when `gelu`, the tanh-GELU applied to each vector of the rows before it is
    /// stored.
    ///
    /// # Safety
    /// As [`finish`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn finish_with<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        rows: usize,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (__mmask16, __mmask16),
        bias: *const f32,
        load: bool,
        gelu: bool,
    ) {
        // SAFETY: the masks keep every access within the extents of # Safety.
        unsafe {
            add_bias(acc, (m0, m1), bias);
            // (Over all R rows with a test, rather than `take(rows)`, so that the loop unrolls
            // and acc stays in registers.)
            for (r, acc) in acc.iter().enumerate() {
                if r < rows {
                    let p = c.add(r * ldc);
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if load {
                        v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), v0);
                        v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p.add(16)), v1);
                    }
                    if gelu {
                        (v0, v1) = (gelu_tanh16(v0), gelu_tanh16(v1));
                    }
                    _mm512_mask_storeu_ps(p, m0, v0);
                    _mm512_mask_storeu_ps(p.add(16), m1, v1);
                }
            }
        }
    }

    /// Adds `bias` (unless null) to every accumulator row.
    ///
    /// # Safety
    /// AVX-512F available; `bias` null or valid for reads of the masked columns.
    #[inline(always)]
    unsafe fn add_bias<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        (m0, m1): (__mmask16, __mmask16),
        bias: *const f32,
    ) {
        if bias.is_null() {
            return;
        }
        // SAFETY: the masks keep the loads within the extents of # Safety.
        unsafe {
            let (z0, z1) = (
                _mm512_maskz_loadu_ps(m0, bias),
                _mm512_maskz_loadu_ps(m1, bias.add(16)),
            );
            for acc in acc.iter_mut() {
                acc[0] = _mm512_add_ps(acc[0], z0);
                acc[1] = _mm512_add_ps(acc[1], z1);
            }
        }
    }

    /// [`finish`] for a bf16 output: each row (plus bias, plus the partial sums that the first
    /// `rows` rows of `c` hold when `load`) rounded to bf16 as [`super::round_bf16`] rounds, put
    /// through the tanh-GELU when `gelu` (on the rounded value widened, the result rounded again:
    /// the activation applied to the bf16 tensor, as a separate bf16 op computes it) and stored to
    /// `out` at stride ldo.
    ///
    /// # Safety
    /// AVX-512F available; with `load`, `c` valid for reads of `rows` rows of the masked columns at
    /// stride ldc; `out` valid for writes of `rows` rows of the masked columns (bf16) at stride ldo;
    /// `bias` null or valid for reads of the masked columns.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn finish_bf16<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        rows: usize,
        (c, ldc): (*const f32, usize),
        (out, ldo): (*mut half::bf16, usize),
        (m0, m1): (__mmask16, __mmask16),
        bias: *const f32,
        load: bool,
        gelu: bool,
    ) {
        // SAFETY: the masks keep every access within the extents of # Safety.
        unsafe {
            add_bias(acc, (m0, m1), bias);
            for (r, acc) in acc.iter().enumerate() {
                if r < rows {
                    let p = c.wrapping_add(r * ldc);
                    let o = out.add(r * ldo) as *mut i16;
                    for (h, m) in [(0, m0), (1, m1)] {
                        let mut v = acc[h];
                        if load {
                            v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, p.add(16 * h)), v);
                        }
                        let mut bits = round16(v);
                        if gelu {
                            bits = round16(gelu_tanh16(_mm512_castsi512_ps(
                                _mm512_slli_epi32::<16>(bits),
                            )));
                        }
                        _mm512_mask_cvtepi32_storeu_epi16(o.add(16 * h), m, bits);
                    }
                }
            }
        }
    }

    /// Stores the finished accumulator rows as `store` says: [`finish`] to `c`, through the
    /// tanh-GELU when asked ([`finish_with`]), or rounded into a bf16 tile ([`finish_bf16`]).
    ///
    /// # Safety
    /// As [`finish`] for `c` (written only without a bf16 tile), and as [`finish_bf16`] for the
    /// bf16 tile.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn store<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        rows: usize,
        (c, ldc): (*mut f32, usize),
        masks: (__mmask16, __mmask16),
        bias: *const f32,
        load: bool,
        store: super::Store,
    ) {
        // SAFETY: the caller's contract is the callees'.
        unsafe {
            match (store.bf16, store.gelu) {
                (None, false) => finish(acc, rows, c, ldc, masks, bias, load),
                (None, true) => finish_with(acc, rows, c, ldc, masks, bias, load, true),
                (Some(out), g) => finish_bf16(acc, rows, (c, ldc), out, masks, bias, load, g),
            }
        }
    }

    /// 16 floats rounded to bf16 (nearest even, any NaN to 0x7fc0), each in the low 16 bits of its
    /// 32-bit lane: [`super::round_bf16`] lane by lane.
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline(always)]
    unsafe fn round16(v: __m512) -> __m512i {
        // SAFETY: AVX-512F is available (# Safety).
        unsafe {
            let b = _mm512_castps_si512(v);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
            let r = _mm512_srli_epi32::<16>(r);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0))
        }
    }
}

use candle_core::{Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// A raw output pointer shared by parallel tasks that write disjoint parts of one output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: an OutPtr is only a shared address; every user writes, from each task, elements no other
// task writes (the tasks of `split_tasks`, or one row or band per task), and reads none of them
// until all tasks have joined. So sending and sharing it is as safe as sending `&mut [T]` pieces.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as for Send.
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// (A method, so that closures capture the wrapper rather than the bare pointer.)
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// Where a packed product's block writes: f32 `out` at row stride `ldo` (which holds the partial
/// sums between blocks of k too), or bf16 `out`, each value rounded once as it leaves the kernel
/// (the partial sums of a k over several blocks kept in a per-thread f32 buffer, [`Sink`]); through
/// the tanh-GELU when `gelu` (in bf16, on the rounded value, rounded again: the bf16 GELU op's
/// values).
#[derive(Clone, Copy)]
pub(crate) enum Dest {
    F32 {
        out: *mut f32,
        ldo: usize,
        gelu: bool,
    },
    Bf16 {
        out: *mut bf16,
        ldo: usize,
        gelu: bool,
    },
}

/// A packed product's output element: f32, or bf16 rounded as the kernel stores it.
pub(crate) trait OutElem: Send + 'static {
    /// The [`Dest`] of a block writing `out` at row stride ldo, through the GELU when `gelu`.
    fn dest(out: *mut Self, ldo: usize, gelu: bool) -> Dest;
}

impl OutElem for f32 {
    fn dest(out: *mut f32, ldo: usize, gelu: bool) -> Dest {
        Dest::F32 { out, ldo, gelu }
    }
}

impl OutElem for bf16 {
    fn dest(out: *mut bf16, ldo: usize, gelu: bool) -> Dest {
        Dest::Bf16 { out, ldo, gelu }
    }
}

/// How a micro-kernel stores one tile's finished sums ([`rows32::store`]): to its f32 partial-sum
/// tile, or rounded into `bf16` (the tile's first value and row stride); through the tanh-GELU
/// when `gelu`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Store {
    pub bf16: Option<(*mut bf16, usize)>,
    pub gelu: bool,
}

thread_local! {
    /// Per-thread f32 partial sums of a bf16-output block whose k spans several blocks.
    static PARTIAL: std::cell::RefCell<aligned::Aligned<f32>> =
        const { std::cell::RefCell::new(aligned::Aligned::new()) };
}

/// One block's [`Dest`], resolved per tile of 32 columns: where the kernel keeps partial sums
/// (f32 out itself, or this thread's buffer of the block's rows and panels when a bf16 output's k
/// spans more than one block) and how it stores a finished tile.
pub(crate) struct Sink {
    dest: Dest,
    /// Partial sums: start, row stride and the column of the start (panel lo's for the buffer).
    partial: (*mut f32, usize, usize),
    buf: aligned::Aligned<f32>,
}

impl Sink {
    /// For rows 0..rows and panels lo..hi (of 32 columns) of a product whose k spans more than one
    /// block when `blocks`, added to what the output holds when `accumulate` (f32 only: panics on
    /// a bf16 output).
    pub(crate) fn new(
        dest: Dest,
        rows: usize,
        (lo, hi): (usize, usize),
        blocks: bool,
        accumulate: bool,
    ) -> Self {
        let f32 = matches!(dest, Dest::F32 { .. });
        assert!(
            f32 || !accumulate,
            "a bf16 product output is never added to"
        );
        let mut buf = PARTIAL.with(|p| p.take());
        let partial = match dest {
            Dest::F32 { out, ldo, .. } => (out, ldo, 0),
            Dest::Bf16 { .. } if blocks => {
                buf.resize(rows * (hi - lo) * 32);
                (buf.as_mut_ptr(), (hi - lo) * 32, lo * 32)
            }
            // (Never read or written: a single block of k stores into bf16 directly.)
            Dest::Bf16 { .. } => (std::ptr::null_mut(), 0, 0),
        };
        Self { dest, partial, buf }
    }

    /// The partial-sum tile of rows r0.. and panel p: its first value and row stride (a pointer
    /// computed without dereferencing; inside the block's lent rows and panels, or the buffer, for
    /// rows r0 < rows and panels lo <= p < hi, where a kernel may touch it).
    pub(crate) fn partial(&self, r0: usize, p: usize) -> (*mut f32, usize) {
        let (start, ld, col0) = self.partial;
        (start.wrapping_add(r0 * ld + p * 32 - col0), ld)
    }

    /// How the tile of rows r0.. and panel p stores its sums after its `last` block of k.
    pub(crate) fn store(&self, r0: usize, p: usize, last: bool) -> Store {
        match (last, self.dest) {
            (false, _) => Store::default(),
            (true, Dest::F32 { gelu, .. }) => Store { bf16: None, gelu },
            (true, Dest::Bf16 { out, ldo, gelu }) => Store {
                bf16: Some((out.wrapping_add(r0 * ldo + p * 32), ldo)),
                gelu,
            },
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        PARTIAL.with(|p| p.replace(std::mem::take(&mut self.buf)));
    }
}

/// Splits a product's m rows and `panels` column panels into tasks `(first row, rows, first panel,
/// end panel)` for the rayon pool: row chunks of at most `max_rows` (a multiple of `granule` but
/// the last), as even as the granule allows and a multiple of the thread count when there are
/// enough rows; column ranges split further when there are fewer chunks than twice the threads.
pub(crate) fn split_tasks(
    m: usize,
    max_rows: usize,
    granule: usize,
    panels: usize,
) -> Vec<(usize, usize, usize, usize)> {
    split_tasks_for(rayon::current_num_threads(), m, max_rows, granule, panels)
}

/// [`split_tasks`] for a given thread count.
fn split_tasks_for(
    threads: usize,
    m: usize,
    max_rows: usize,
    granule: usize,
    panels: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let threads = threads.max(1);
    let mut chunks = m.div_ceil(max_rows);
    if m >= threads * max_rows / 2 {
        chunks = chunks.next_multiple_of(threads);
    }
    let per_chunk = m.div_ceil(chunks.max(1)).next_multiple_of(granule);
    let chunks = m.div_ceil(per_chunk.max(1));
    let split = (2 * threads)
        .div_ceil(chunks.max(1))
        .clamp(1, panels.max(1));
    let per = panels.div_ceil(split);
    (0..chunks)
        .flat_map(|c| {
            let (r0, rows) = (c * per_chunk, per_chunk.min(m - c * per_chunk));
            (0..split)
                .map(move |s| (r0, rows, s * per, ((s + 1) * per).min(panels)))
                .filter(|&(_, _, lo, hi)| lo < hi)
        })
        .collect()
}

/// A packed right operand (k x n, in panels of `NR` columns), as the shared product drivers see it.
pub trait PackedOperand: Sync {
    fn k(&self) -> usize;
    fn n(&self) -> usize;
    /// Column panels.
    fn panels(&self) -> usize;
}

/// A kernel's block: the sum over taps t of rows 0..rows of `a[offsets[t]..]` (stride lda) times
/// panels lo..hi of `bs[t]` (+ bias, when given) into `out` (stride ldo, of element type O: f32, or
/// bf16 for kernels that round their output), added to what it holds when `accumulate`. A single
/// product is one tap at offset 0.
///
/// Its safety contract, which the drivers below meet: the kernel's CPU features are available;
/// there is at least one tap, every `bs[t]` has the first's shape, and `a[offsets[t]..]` holds
/// `rows` rows at stride lda, each at least k long; `out` is valid for reads and writes of rows
/// 0..rows at stride ldo, columns of panels lo..hi below n, and no other thread touches them during
/// the call; hi <= the panel count; bias is None or has n values. Without `accumulate` those
/// values may be uninitialised ([`Product::vec`]): a block writes every one of them and reads one
/// (a partial sum over a later block of k, a later tap's) only after writing it.
pub(crate) type Block<A, B, O = f32> = unsafe fn(BlockArgs<'_, A, B, O>);

/// The operands of a [`Block`].
pub(crate) struct BlockArgs<'a, A, B, O> {
    pub a: &'a [A],
    pub offsets: &'a [usize],
    pub rows: usize,
    pub lda: usize,
    pub bs: &'a [B],
    /// Panels lo..hi.
    pub panels: (usize, usize),
    pub bias: Option<&'a [f32]>,
    pub out: *mut O,
    pub ldo: usize,
    pub accumulate: bool,
}

/// A block of one tap: [`Block`] with `a` and `b` that tap's (`a` already at its offset).
pub(crate) type TapBlock<A, B, O = f32> =
    unsafe fn(&[A], usize, usize, &B, usize, usize, Option<&[f32]>, *mut O, usize, bool);

/// A [`Block`] run tap by tap by `one`: each tap's product added to the sums of those before it,
/// the bias with the last.
///
/// # Safety
/// [`Block`]'s contract, with `one` a block of that contract for one tap.
pub(crate) unsafe fn tap_by_tap<A, B, O>(one: TapBlock<A, B, O>, args: BlockArgs<'_, A, B, O>) {
    let last = args.bs.len().saturating_sub(1);
    for (t, (&off, b)) in args.offsets.iter().zip(args.bs).enumerate() {
        let bias = if t == last { args.bias } else { None };
        let (lo, hi) = args.panels;
        // SAFETY: tap t alone meets the contract the caller's taps meet together.
        unsafe {
            one(
                &args.a[off..],
                args.rows,
                args.lda,
                b,
                lo,
                hi,
                bias,
                args.out,
                args.ldo,
                args.accumulate || t > 0,
            )
        };
    }
}

/// Whether a block of a product reads A where it lies (a pointer per row) rather than copying it
/// into micro-panels first: where the copy would not pay, because few of its `panels` share it (a
/// narrow layer, a convolution tap's output channels), or because its `rows` x `kc` values of
/// `size` bytes are few enough to stay in L2 across the panels (a convolution's band). The
/// transformers' long-k, many-panel products keep the copy, which the kernel streams contiguously
/// (`examples/gemm_bench.rs`: in place there lost up to 25%).
pub(crate) fn reads_a_in_place(panels: usize, rows: usize, kc: usize, size: usize) -> bool {
    panels <= 8 || rows * kc * size <= 512 << 10
}

/// A kernel's entry for a [`Block`]: one that sums the taps itself (in its own order, or fused),
/// or one that takes a tap at a time, whose taps [`tap_by_tap`] runs.
pub(crate) enum Kernel<A: 'static, B, O: 'static = f32> {
    Taps(Block<A, B, O>),
    Tap(TapBlock<A, B, O>),
}

impl<A, B, O> Clone for Kernel<A, B, O> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, B, O> Copy for Kernel<A, B, O> {}

impl<A, B, O> Kernel<A, B, O> {
    /// The [`Block`] through this entry.
    ///
    /// # Safety
    /// [`Block`]'s contract.
    unsafe fn run(self, args: BlockArgs<'_, A, B, O>) {
        // SAFETY: the caller's contract is the one both entries take.
        unsafe {
            match self {
                Kernel::Taps(block) => block(args),
                Kernel::Tap(one) => tap_by_tap(one, args),
            }
        }
    }
}

/// A packed product's kernel: its name, whether its features are available, its block and its
/// (max rows per task, rows per micro-kernel); its output elements are O.
pub(crate) struct Product<A: 'static, B, O: 'static = f32> {
    pub name: &'static str,
    pub available: fn() -> bool,
    pub block: Kernel<A, B, O>,
    pub rows: (usize, usize),
}

impl<A: Sync, B: PackedOperand, O: Send> Product<A, B, O> {
    /// Panics unless the kernel is available and the operands hold the shapes.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        a: &[A],
        m: usize,
        lda: usize,
        b: &B,
        bias: Option<&[f32]>,
        out_len: usize,
        ldo: usize,
    ) {
        let name = self.name;
        assert!(
            (self.available)(),
            "{name} matmul called where {name} is not available"
        );
        assert!(
            lda >= b.k() && ldo >= b.n(),
            "row strides shorter than the rows"
        );
        if m > 0 {
            assert!(a.len() >= (m - 1) * lda + b.k(), "A is too short");
            assert!(out_len >= (m - 1) * ldo + b.n(), "output is too short");
        }
        if let Some(bias) = bias {
            assert_eq!(bias.len(), b.n(), "bias length");
        }
    }

    /// `out (m x n) (+)= Σ_t a[offsets[t] ..] (m x k, row stride lda) · bs[t] (+ bias, with the
    /// last tap)` on the rayon pool, each task running every tap over its block of rows and panels
    /// ([`split_tasks`]); added to `out` as it stands when `add`. Panics on a shape mismatch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn taps(
        &self,
        a: &[A],
        offsets: &[usize],
        m: usize,
        lda: usize,
        bs: &[B],
        bias: Option<&[f32]>,
        out: &mut [O],
        ldo: usize,
        add: bool,
    ) {
        let out = (out.as_mut_ptr(), out.len());
        // SAFETY: a slice is valid for reads and writes of its length, initialised, and borrowed
        // exclusively for the call.
        unsafe { self.taps_into(a, offsets, m, lda, bs, bias, out, ldo, add) }
    }

    /// [`Self::one`] without `add`, into a new (m x n) row-major vector written once: without the
    /// pass that zeroes a vector first ([`super::amx::matmul_vec`] likewise).
    pub(crate) fn vec(&self, a: &[A], m: usize, lda: usize, b: &B, bias: Option<&[f32]>) -> Vec<O> {
        let (n, len) = (b.n(), m * b.n());
        let mut out = Vec::with_capacity(len);
        // SAFETY: out's buffer holds len = m x n values at row stride n, and no one else sees it.
        // Without `add` every value is written before it is read (taps_into's contract), and the
        // tasks partition the rows and column panels, so all len values are written before
        // set_len makes them readable; on a panic out is dropped with length 0.
        unsafe {
            let b = std::slice::from_ref(b);
            self.taps_into(a, &[0], m, lda, b, bias, (out.as_mut_ptr(), len), n, false);
            out.set_len(len);
        }
        out
    }

    /// [`Self::taps`] into `out.0`, `out.1` values long.
    ///
    /// # Safety
    /// `out.0` is valid for writes of `out.1` values and no one else touches them during the call;
    /// with `add` they are initialised. Without `add` they may be uninitialised: the kernels then
    /// read an output value (a product's partial sums over later blocks of k) only after they
    /// have written it, and write every value of their tasks' rows and panels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn taps_into(
        &self,
        a: &[A],
        offsets: &[usize],
        m: usize,
        lda: usize,
        bs: &[B],
        bias: Option<&[f32]>,
        (out, out_len): (*mut O, usize),
        ldo: usize,
        add: bool,
    ) {
        assert_eq!(offsets.len(), bs.len(), "one offset per tap");
        let Some(b) = bs.first() else {
            panic!("no taps")
        };
        for (&off, bt) in offsets.iter().zip(bs) {
            assert!(bt.k() == b.k() && bt.n() == b.n(), "taps differ in shape");
            self.check(&a[off.min(a.len())..], m, lda, bt, bias, out_len, ldo);
        }
        if m == 0 || b.n() == 0 {
            return;
        }
        let (max_rows, granule) = self.rows;
        let tasks = split_tasks(m, max_rows, granule, b.panels());
        let optr = OutPtr(out);
        tasks.par_iter().for_each(|&(r0, rows, lo, hi)| {
            // SAFETY: the kernel is available and a and out (out_len values, the caller's
            // contract) hold the shapes (check); each task writes its own rows x panels block of
            // out (split_tasks), which no other task touches, and without `add` reads none of it
            // before writing it (the block's contract, met by out's values where uninitialised).
            unsafe {
                self.block.run(BlockArgs {
                    a: &a[r0 * lda..],
                    offsets,
                    rows,
                    lda,
                    bs,
                    panels: (lo, hi),
                    bias,
                    out: optr.get().add(r0 * ldo),
                    ldo,
                    accumulate: add,
                })
            };
        });
    }

    /// [`Self::taps`] for one product: `out (m x n) (+)= a (m x k, row stride lda) · b (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn one(
        &self,
        a: &[A],
        m: usize,
        lda: usize,
        b: &B,
        bias: Option<&[f32]>,
        out: &mut [O],
        ldo: usize,
        add: bool,
    ) {
        let b = std::slice::from_ref(b);
        self.taps(a, &[0], m, lda, b, bias, out, ldo, add)
    }

    /// `out (m x n) = a · b` without bias, on the calling thread (for callers that parallelise
    /// outside). Panics on a shape mismatch.
    pub(crate) fn serial(&self, a: &[A], m: usize, lda: usize, b: &B, out: &mut [O], ldo: usize) {
        self.check(a, m, lda, b, None, out.len(), ldo);
        if m == 0 || b.n() == 0 {
            return;
        }
        let chunk = self.rows.0;
        for c in 0..m.div_ceil(chunk) {
            let rows = chunk.min(m - c * chunk);
            // SAFETY: the kernel is available and the slices hold the shapes (check); rows of
            // chunk c lie inside a and out, which this thread holds exclusively.
            unsafe {
                self.block.run(BlockArgs {
                    a: &a[c * chunk * lda..],
                    offsets: &[0],
                    rows,
                    lda,
                    bs: std::slice::from_ref(b),
                    panels: (0, b.panels()),
                    bias: None,
                    out: out.as_mut_ptr().add(c * chunk * ldo),
                    ldo,
                    accumulate: false,
                })
            };
        }
    }
}

/// The bytes of values of T.
pub(crate) fn bytes_of<T: AnyBits>(v: &[T]) -> &[u8] {
    // SAFETY: T is plain data without padding (AnyBits), so its memory is initialised bytes; the
    // slice covers exactly v's memory and borrows it for v's lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Types for which every bit pattern is a value.
///
/// # Safety
/// Implementors are plain data with no invalid bit patterns and no padding.
pub(crate) unsafe trait AnyBits: Copy {}
// SAFETY: every 32-bit pattern is an f32 (NaNs included).
unsafe impl AnyBits for f32 {}
// SAFETY: bf16 is a u16 underneath; every pattern is a value.
unsafe impl AnyBits for bf16 {}
// SAFETY: f16 is a u16 underneath; every pattern is a value.
unsafe impl AnyBits for half::f16 {}

/// Little-endian bytes as values of T, when they are aligned for T and whole.
pub(crate) fn values<T: AnyBits>(bytes: &[u8]) -> Option<&[T]> {
    if !cfg!(target_endian = "little") {
        return None;
    }
    // SAFETY: every bit pattern is a T (AnyBits); align_to only hands out the correctly aligned
    // middle part.
    let (head, mid, tail) = unsafe { bytes.align_to::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Packs an (n x k) row-major weight `w` into `data`, whose panels of `panel` values each hold
/// `cols` rows of w (the last fewer): `fill(panel number, panel)` on the pool, in runs of about
/// 16 MiB of w (at least four panels per thread), each run's rows of w then passed to `done`, so
/// that a file's pages are released as they are packed rather than all resident at the end.
pub(crate) fn pack_in_runs<S: Sync, E: Send>(
    data: &mut [E],
    (panel, cols): (usize, usize),
    w: &[S],
    (n, k): (usize, usize),
    done: impl Fn(&[S]),
    fill: impl Fn(usize, &mut [E]) + Sync,
) {
    if panel == 0 || k == 0 {
        return;
    }
    let per = ((16 << 20) / (k * cols * size_of::<S>()))
        .max(4 * rayon::current_num_threads())
        .max(1);
    for (run, panels) in data.chunks_mut(per * panel).enumerate() {
        panels
            .par_chunks_mut(panel)
            .enumerate()
            .for_each(|(i, dst)| fill(run * per + i, dst));
        let rows = (run * per * cols).min(n)..((run + 1) * per * cols).min(n);
        done(&w[rows.start * k..rows.end * k]);
    }
}

/// `w` converted into `out` (of w's length) slab by slab (4 Mi values) by `convert(slab, out)`,
/// each slab's bytes then passed to `done`: weight bytes read from a file mapping are released as
/// they are converted, never resident whole beside the copy.
pub(crate) fn convert_slabs<S: AnyBits, D>(
    w: &[S],
    mut out: Vec<D>,
    done: &dyn Fn(&[u8]),
    convert: impl Fn(&[S], &mut [D]),
) -> Vec<D> {
    const SLAB: usize = 4 << 20;
    assert_eq!(w.len(), out.len(), "convert_slabs: lengths differ");
    for (w, o) in w.chunks(SLAB).zip(out.chunks_mut(SLAB)) {
        convert(w, o);
        done(bytes_of(w));
    }
    out
}

/// `w` rounded to bf16 (nearest even, [`elementwise::round_to_bf16`] on the rayon pool) by
/// [`convert_slabs`]; the output starts as calloc's zero pages, first written by the pool.
pub(crate) fn rounded_to_bf16(w: &[f32], done: &dyn Fn(&[u8])) -> Vec<bf16> {
    use half::vec::HalfBitsVecExt;
    let zeros = vec![0u16; w.len()].reinterpret_into::<bf16>();
    convert_slabs(w, zeros, done, elementwise::round_to_bf16)
}

/// Adds `bias` to each row of `out` (rows of `bias.len()` values): a product's bias, added once to
/// its f32 sums.
pub(crate) fn add_bias(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len().max(1)) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// Calls `f` with the elements of a CPU tensor of element type `T` in row-major order (copying only
/// if the tensor is not contiguous).
pub fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Ok(f(&cpu.as_slice::<T>()?[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("expected a CPU tensor, got one on {:?}", t.device()),
    }
}

/// Calls `f` with the elements of several CPU tensors of element type `T`, each in row-major order
/// (copying only those that are not contiguous).
pub fn with_slices<T: candle_core::WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = held
        .iter()
        .zip(&ts)
        .map(|((storage, layout), t)| match &**storage {
            Storage::Cpu(cpu) => {
                let start = layout.start_offset();
                Ok(&cpu.as_slice::<T>()?[start..start + t.elem_count()])
            }
            _ => candle_core::bail!("expected a CPU tensor, got one on {:?}", t.device()),
        })
        .collect::<Result<Vec<&[T]>>>()?;
    Ok(f(&slices))
}

/// `dst = lhs · rhs` in f32 on the `gemm` crate (candle's own product: AVX2 and FMA where the CPU
/// has them), where AVX-512 is missing: dst (rows x cols) row-major at row stride `ldd`, lhs (rows
/// x inner) and rhs (inner x cols) given with their (column, row) strides, element (r, c) at
/// `c cs + r rs`. On the calling thread, or with `parallel` on the rayon pool's threads (for a
/// product of a million multiply-adds or more). Panics unless every element the product reads or
/// writes lies inside its slice.
///
/// Each row of dst is the same whatever rows are multiplied beside it (a batch of images gets each
/// image's values from a run of its own): the crate picks a kernel, and with it an order of sums,
/// by the product's shape -- dot products for at most 256 outputs, a matrix-vector kernel for one
/// row, and blocks of k sized by the shape below 64 x 64 and by k alone above. So the product runs
/// with at least [`min_rows`] rows (fewer are padded with zero rows, into a scratch copy) and
/// [`GEMM_KC`] values of k at most per call, one block of k each, added to dst: one kernel and one
/// order of sums for every row count.
pub(crate) fn gemm_f32(
    (rows, cols, inner): (usize, usize, usize),
    (dst, ldd): (&mut [f32], usize),
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
    parallel: bool,
) {
    // The offset of the last element of an r x c operand (r, c >= 1).
    let last = |cs: usize, rs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(rows * cols * inner > 0 && ldd >= cols && dst.len() > last(1, ldd, rows, cols));
    assert!(lhs.len() > last(lhs_cs, lhs_rs, rows, inner));
    assert!(rhs.len() > last(rhs_cs, rhs_rs, inner, cols));
    let padded = min_rows(cols);
    if rows < padded {
        // The rows, then zero rows, contiguous; the product into a scratch block, then its rows.
        let mut a = vec![0f32; padded * inner];
        for (r, row) in a.chunks_exact_mut(inner).take(rows).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = lhs[r * lhs_rs + c * lhs_cs];
            }
        }
        let mut out = vec![0f32; padded * cols];
        gemm_f32_blocks(
            (padded, cols, inner),
            (&mut out, cols),
            (&a, 1, inner),
            (rhs, rhs_cs, rhs_rs),
            parallel,
        );
        for (r, row) in out.chunks_exact(cols).take(rows).enumerate() {
            dst[r * ldd..r * ldd + cols].copy_from_slice(row);
        }
        return;
    }
    gemm_f32_blocks(
        (rows, cols, inner),
        (dst, ldd),
        (lhs, lhs_cs, lhs_rs),
        (rhs, rhs_cs, rhs_rs),
        parallel,
    );
}

/// The most values of k one call of the `gemm` crate sums in [`gemm_f32`]: its smallest block of
/// k, so that each call sums k in one block whatever the shape.
const GEMM_KC: usize = 512;

/// The fewest rows [`gemm_f32`] hands the crate for `cols` columns: two (one row takes its
/// matrix-vector kernel), and more than 256 outputs (fewer take its dot-product kernel).
fn min_rows(cols: usize) -> usize {
    (256 / cols + 1).max(2)
}

/// [`gemm_f32`]'s calls of the crate (rows >= [`min_rows`], the checks done): k in blocks of
/// [`GEMM_KC`], the first written to dst, the next added to it.
fn gemm_f32_blocks(
    (rows, cols, inner): (usize, usize, usize),
    (dst, ldd): (&mut [f32], usize),
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
    parallel: bool,
) {
    let threads = match rayon::current_num_threads() {
        n if parallel && n > 1 && rows * cols * inner >= 1 << 20 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    for k0 in (0..inner).step_by(GEMM_KC) {
        let kc = GEMM_KC.min(inner - k0);
        // SAFETY: the product reads lhs and rhs and writes dst at the strides given, every
        // element of which lies inside its slice (the caller's checks: the offsets grow with r
        // and c, so the last is the largest, and k0 + kc <= inner); dst is borrowed mutably, so
        // nothing else touches it. alpha 0 (the first block): dst is written, not read.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                kc,
                dst.as_mut_ptr(),
                1,
                ldd as isize,
                k0 > 0,
                lhs.as_ptr().add(k0 * lhs_cs),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr().add(k0 * rhs_rs),
                rhs_cs as isize,
                rhs_rs as isize,
                if k0 > 0 { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                threads,
            )
        }
    }
}

/// f32 -> bf16, round to nearest even (as `half`'s conversion), written so that loops vectorise.
#[inline(always)]
pub fn round_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    let r = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    bf16::from_bits(if v.is_nan() { 0x7fc0 } else { r })
}

/// An element type of the vectorised passes ([`elementwise`]): f32, or bf16 computed in f32 with
/// each operation's result rounded to bf16 (the roundings of the composed bf16 ops).
pub trait Lane: candle_core::WithDType + Copy + Send + Sync {
    fn widen(self) -> f32;
    /// `v` as one operation in this type leaves it: as it is in f32, rounded (nearest even) in bf16.
    fn round(v: f32) -> f32;
    /// `v` stored in this type (rounded as [`Lane::round`]).
    fn narrow(v: f32) -> Self;
    /// `x` as f32: where it lies for f32, widened (exactly, vectorised) into `buf` for bf16.
    fn f32s<'a>(x: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl Lane for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
    fn f32s<'a>(x: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        x
    }
}

impl Lane for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        round_bf16(v).to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        round_bf16(v)
    }
    fn f32s<'a>(x: &'a [bf16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(x.len(), 0.0);
        elementwise::widen_bf16(x, buf);
        buf
    }
}

/// Σ f(x) over 16 lanes and then across them, so that the loop vectorises; inlined into each
/// caller so it is compiled with the caller's features (AVX-512 inside `vector_dispatch!`).
#[inline(always)]
pub(crate) fn lane_sum<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `len` values uniform in [lo, hi) from a 64-bit LCG, for the kernels' tests.
#[cfg(test)]
pub(crate) fn lcg_uniform(len: usize, seed: &mut u64, lo: f32, hi: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * (hi - lo) + lo
        })
        .collect()
}

/// Normal(0, std) values (Box-Muller over [`lcg_uniform`], so that a run is reproducible).
#[cfg(test)]
pub(crate) fn lcg_normal(len: usize, std: f32, mut seed: u64) -> Vec<f32> {
    let u = lcg_uniform(2 * len, &mut seed, 0.0, 1.0);
    u.chunks_exact(2)
        .map(|p| {
            let r = (-2.0 * (1.0 - p[0]).ln()).sqrt();
            std * r * (std::f32::consts::TAU * p[1]).cos()
        })
        .collect()
}

/// `a (m x k, row stride lda) · wᵀ` in f64 with w (n x k) row-major: the products' reference.
#[cfg(test)]
pub(crate) fn reference_product(
    a: &[f64],
    m: usize,
    lda: usize,
    w: &[f64],
    n: usize,
    k: usize,
) -> Vec<f64> {
    (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            (0..k).map(|p| a[i * lda + p] * w[j * k + p]).sum()
        })
        .collect()
}

/// w (n x k) row-major as (k x n) row-major.
#[cfg(test)]
pub(crate) fn transpose<T: Copy>(w: &[T], n: usize, k: usize) -> Vec<T> {
    (0..k * n).map(|i| w[(i % n) * k + i / n]).collect()
}

/// Checks a packer of bf16 weights from f32 rows rounded as it goes (`rounded(w, n, k, done)`,
/// the packed bits) against packing the weight rounded whole (`whole(w, n, k)`), bit for bit, on
/// partial blocks of k and n and a weight of two 16 MiB runs on two threads, and that `done` is
/// handed every row once, in order.
#[cfg(test)]
pub(crate) fn check_rounded_packing(
    whole: impl Fn(&[bf16], usize, usize) -> Vec<u16>,
    rounded: impl Fn(&[f32], usize, usize, &dyn Fn(&[f32])) -> Vec<u16>,
) {
    for (n, k) in [(1, 2), (37, 131), (70, 96), (1100, 4096)] {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 10007) as f32 - 5003.0) * 1.37e-3)
            .collect();
        let seen = std::sync::Mutex::new(Vec::new());
        let got = rounded(&w, n, k, &|r| {
            let start = (r.as_ptr() as usize - w.as_ptr() as usize) / size_of::<f32>();
            seen.lock().unwrap().push((start, r.len()));
        });
        assert_eq!(got, whole(&rounded_to_bf16(&w, &|_| ()), n, k), "{n}x{k}");
        let mut next = 0;
        for (start, len) in seen.into_inner().unwrap() {
            assert_eq!(start, next, "{n}x{k}");
            next += len;
        }
        assert_eq!(next, n * k, "{n}x{k}");
    }
}

/// A CPU f32 tensor of Normal(0, std) values, reproducible from the seed.
#[cfg(test)]
pub(crate) fn normal_tensor(shape: impl Into<candle_core::Shape>, std: f32, seed: u64) -> Tensor {
    let shape = shape.into();
    let v = lcg_normal(shape.elem_count(), std, seed);
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).expect("length matches the shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each part arrives zeroed (over memory a dirty vector of the same size just gave back),
    /// numbered from its first value, the last one shorter; what `fill` writes is kept.
    #[test]
    fn par_new_hands_each_part_zeroed_and_keeps_what_is_written() {
        for (len, chunk) in [(0, 5), (1, 5), (1000, 7), (4096, 4096), (10_000, 1024)] {
            drop(std::hint::black_box(vec![u32::MAX; len]));
            let parts = std::sync::atomic::AtomicUsize::new(0);
            let v = par_new(
                len,
                chunk,
                0u32,
                || (),
                |_, i, part| {
                    assert!(part.iter().all(|&x| x == 0), "part {i} not zeroed");
                    assert_eq!(part.len(), chunk.min(len - i * chunk));
                    parts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Every other value written: the rest stays zero.
                    for (j, x) in part.iter_mut().enumerate().step_by(2) {
                        *x = (i * chunk + j) as u32 + 1;
                    }
                },
            );
            assert_eq!(parts.into_inner(), len.div_ceil(chunk));
            let want: Vec<u32> = (0..len)
                .map(|g| match (g % chunk) % 2 {
                    0 => g as u32 + 1,
                    _ => 0,
                })
                .collect();
            assert_eq!(v, want, "len {len}, chunk {chunk}");
        }
    }

    #[test]
    fn round_bf16_equals_half() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0, // a tie: rounds to even (down)
            1.0 + 3.0 / 256.0, // a tie: rounds to even (up)
            -3.3e-5,
            6.5e4,
            3.0e38,
            f32::INFINITY,
            1e-40,
        ] {
            assert_eq!(round_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let v = f32::from_bits(s & 0x7f7f_ffff) * if s & 1 == 0 { 1.0 } else { -1.0 };
            assert_eq!(round_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{v}");
        }
    }

    /// Each row of [`gemm_f32`]'s product is the same alone, in any block of rows beside it and
    /// at any row stride, bit for bit, and within 2e-6 x the sum of |terms| of an f64 product:
    /// shapes across the crate's dot-product (<= 256 outputs), matrix-vector (one row) and
    /// small-shape (<= 64 x 64) kernels and blocks of k (k over 512, k <= 2).
    #[test]
    fn gemm_f32_rows_do_not_depend_on_the_rows_beside_them() {
        let mut seed = 3;
        for cols in [1, 7, 16, 64, 65, 128, 300] {
            for inner in [1, 2, 3, 100, 512, 513, 1100] {
                let rows = 70;
                let lhs = lcg_uniform(rows * inner, &mut seed, -1.0, 1.0);
                // rhs as a weight stores it (cols x inner), read as inner x cols.
                let rhs = lcg_uniform(cols * inner, &mut seed, -1.0, 1.0);
                let product = |r0: usize, n: usize, ldd: usize| {
                    let mut out = vec![f32::NAN; n * ldd];
                    let a = &lhs[r0 * inner..(r0 + n) * inner];
                    gemm_f32(
                        (n, cols, inner),
                        (&mut out, ldd),
                        (a, 1, inner),
                        (&rhs, inner, 1),
                        true,
                    );
                    out
                };
                let all = product(0, rows, cols);
                for r in 0..rows {
                    let (a, w) = (&lhs[r * inner..][..inner], |c: usize| {
                        &rhs[c * inner..][..inner]
                    });
                    for c in 0..cols {
                        let exact: f64 = a.iter().zip(w(c)).map(|(x, y)| f64::from(x * y)).sum();
                        let size: f64 = a
                            .iter()
                            .zip(w(c))
                            .map(|(x, y)| f64::from((x * y).abs()))
                            .sum();
                        let got = f64::from(all[r * cols + c]);
                        assert!((got - exact).abs() <= 2e-6 * size, "{rows}x{inner}x{cols}");
                    }
                }
                for (r0, n) in [(0, 1), (5, 1), (3, 2), (10, 3), (0, 8), (20, 40), (1, 69)] {
                    let ldd = cols + 3;
                    let some = product(r0, n, ldd);
                    for r in 0..n {
                        let (got, want) =
                            (&some[r * ldd..][..cols], &all[(r0 + r) * cols..][..cols]);
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(g, w)| g.to_bits() == w.to_bits()),
                            "{n} rows from {r0} of {rows}x{inner}x{cols}: row {r}"
                        );
                        assert!(some[r * ldd + cols..(r + 1) * ldd]
                            .iter()
                            .all(|v| v.is_nan()));
                    }
                }
            }
        }
    }

    /// The tasks behind [`OutPtr`] writes: every (row, panel) of the output belongs to exactly one
    /// task, every task's rows are at most `max_rows`, and every chunk but the last starts on a
    /// multiple of the granule, for the kernels' block sizes and odd ones, over thread counts.
    #[test]
    fn split_tasks_are_disjoint_and_cover_the_output() {
        for threads in [1, 2, 3, 8, 64] {
            for &(max_rows, granule) in &[(256, 32), (448, 14), (5, 1)] {
                for m in [0, 1, 13, 31, 32, 33, 255, 256, 257, 1000, 4429, 9000] {
                    for panels in [0, 1, 2, 7, 48, 97] {
                        let tasks = split_tasks_for(threads, m, max_rows, granule, panels);
                        let mut owner = vec![0u8; m * panels];
                        for &(r0, rows, lo, hi) in &tasks {
                            assert!(rows > 0 && rows <= max_rows && lo < hi && hi <= panels);
                            assert!(r0 % granule == 0 || r0 + rows == m);
                            for r in r0..r0 + rows {
                                for p in lo..hi {
                                    owner[r * panels + p] += 1;
                                }
                            }
                        }
                        assert!(
                            owner.iter().all(|&n| n == 1),
                            "threads {threads}, m {m}, max_rows {max_rows}, granule {granule}, \
                             panels {panels}: {tasks:?}"
                        );
                    }
                }
            }
        }
    }
}
