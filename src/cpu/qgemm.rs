//! Matrix products on GGML blocks (GGUF weights and `--quantize`) with AVX-512 VNNI, the weight held
//! as the file stores it: no second copy, no repacked tiles, so a quantized model takes its file's
//! bytes in memory.
//!
//! A product `out = a · wᵀ` runs as llama.cpp's do: each row of `a` is quantized to 8-bit blocks
//! of 32 values (one f32 scale per block, as GGML's Q8_0), and the products are integer dot
//! products. What differs is where the weight is decoded. Every GGML type is a grid: each group of
//! 16 or 32 values of a row is `scale * c + offset` with `c` a small unsigned integer code. So a
//! weight is decoded, a band of 32 rows by up to [`KC`] columns at a time, into those codes (one
//! byte each, laid out for `vpdpbusd`) and per-group scales and offsets, in a buffer that stays in
//! the L2 cache while every activation row passes over it. A value's product is then
//! `scale * Σ c·q * a_scale + offset * Σ q * a_scale` per group: one VNNI instruction per 64
//! multiply-adds, and per group two FMAs for the scales. The decoding costs a few cycles per weight
//! value per product, against the `m` multiply-adds each value takes part in.

use super::aligned::Aligned;
use super::{split_tasks, OutPtr};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Output columns per panel: two vectors of 16 f32 accumulators.
const NR: usize = 32;
/// Activation rows per micro-kernel call.
const MR: usize = 4;
/// Weight values (of a row) decoded per band: a multiple of every block size.
const KC: usize = 512;
/// Panels decoded together: 16 x 32 x 512 codes (256 KiB) and their scales stay in L2.
const PB: usize = 16;
/// Rows per task (the rayon tasks of [`split_tasks`]).
const MC: usize = 2048;

/// Whether the products can run here: AVX-512 with VNNI, by the feature switch.
pub fn available() -> bool {
    super::features().vnni
}

/// The values per scale of a type (16 or 32), or `None` for a type this kernel does not decode
/// (floats, and the IQ/TQ types, which the loader refuses).
pub fn group(dtype: GgmlDType) -> Option<usize> {
    use GgmlDType as T;
    match dtype {
        T::Q8_0 | T::Q4_0 | T::Q4_1 | T::Q5_0 | T::Q5_1 | T::Q4K | T::Q5K => Some(32),
        T::Q6K | T::Q3K | T::Q2K => Some(16),
        _ => None,
    }
}

/// A weight of n rows by k values in GGML blocks, each row `k / block size` blocks, row after row
/// (a GGUF tensor's bytes).
#[derive(Debug)]
pub struct QWeight {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    bytes: Vec<u8>,
}

impl QWeight {
    /// The weight, if `bytes` are exactly n rows of k values of `dtype` and the type is one the
    /// kernel decodes; the error names what does not fit.
    pub fn new(dtype: GgmlDType, n: usize, k: usize, bytes: Vec<u8>) -> Result<Self, String> {
        if group(dtype).is_none() {
            return Err(format!("{dtype:?} is not a block type this kernel decodes"));
        }
        let bs = dtype.block_size();
        if !k.is_multiple_of(bs) {
            return Err(format!(
                "rows of {k} values are not whole {dtype:?} blocks ({bs})"
            ));
        }
        let want = n * (k / bs) * dtype.type_size();
        if bytes.len() != want {
            return Err(format!(
                "{n} x {k} {dtype:?} takes {want} bytes, given {}",
                bytes.len()
            ));
        }
        Ok(Self { dtype, n, k, bytes })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The blocks, as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn row_bytes(&self) -> usize {
        self.k / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Activation elements the product takes: f32, or bf16 (widened exactly as it is quantized).
pub trait Source: Copy + Send + Sync + 'static {
    const BF16: bool;
}
impl Source for f32 {
    const BF16: bool = false;
}
impl Source for bf16 {
    const BF16: bool = true;
}

/// `out (m x n) = a (m x k, row-major) · wᵀ (+ bias)`, on the rayon pool.
/// Panics if [`available`] is false or the slices do not hold the shapes.
pub fn matmul<S: Source>(a: &[S], m: usize, w: &QWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(available(), "the GGML block kernel needs AVX-512 VNNI");
    let (n, k) = (w.n, w.k);
    assert!(a.len() >= m * k && out.len() >= m * n, "operands too short");
    assert!(bias.is_none_or(|b| b.len() >= n), "bias too short");
    if m == 0 || n == 0 {
        return;
    }
    let g = group(w.dtype).expect("checked by QWeight::new");
    let act = Activations::quantize(a, m, k, g);
    let panels = n.div_ceil(NR);
    let tasks = split_tasks(m, MC, MR, panels);
    let optr = OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(r0, rows, lo, hi)| {
        let mut band = Band::new(g);
        for p0 in (lo..hi).step_by(PB) {
            let p1 = (p0 + PB).min(hi);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                band.decode(w, p0, p1, k0, kc);
                let last = k0 + kc == k;
                for r in (r0..r0 + rows).step_by(MR) {
                    let mr = MR.min(r0 + rows - r);
                    for p in p0..p1 {
                        let cols = NR.min(n - p * NR);
                        let bias = match (last, bias) {
                            (true, Some(b)) => b[p * NR..].as_ptr(),
                            _ => std::ptr::null(),
                        };
                        // SAFETY: VNNI is available (asserted); the band holds panels p0..p1 for
                        // kc values from k0 (decode), the activations m rows of k (quantize), out
                        // m x n (asserted) of which this task alone writes rows r0..r0 + rows,
                        // panels lo..hi (split_tasks); bias is null or holds n values.
                        unsafe {
                            kernel::run(
                                mr,
                                g,
                                act.at(r, k0),
                                band.panel(p - p0),
                                kc,
                                optr.get().add(r * n + p * NR),
                                n,
                                cols,
                                k0 > 0,
                                bias,
                            )
                        };
                    }
                }
            }
        }
    });
}

/// The activations quantized: per row, k signed bytes, one scale per 32 values, and per group of
/// the weight's (16 or 32 values) the group's sum times its scale (for the offsets).
struct Activations {
    k: usize,
    g: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<f32>,
}

/// Pointers into [`Activations`] at one row and value.
#[derive(Clone, Copy)]
struct ActPtr {
    q: *const i8,
    lq: usize,
    scale: *const f32,
    ls: usize,
    sum: *const f32,
    lg: usize,
}

impl Activations {
    fn quantize<S: Source>(a: &[S], m: usize, k: usize, g: usize) -> Self {
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; m * k / 32];
        let mut sum = vec![0f32; m * k / g];
        q.par_chunks_mut(k)
            .zip(scale.par_chunks_mut(k / 32))
            .zip(sum.par_chunks_mut(k / g))
            .zip(a.par_chunks(k))
            .for_each(|(((q, s), sm), x)| {
                // SAFETY: AVX-512 with VNNI (and BW) is available (checked by matmul); the
                // slices are one row: k values, k / 32 scales, k / g sums.
                unsafe { kernel::quantize_row(x, q, s, sm, g) }
            });
        Self {
            k,
            g,
            q,
            scale,
            sum,
        }
    }

    fn at(&self, row: usize, k0: usize) -> ActPtr {
        let (k, g) = (self.k, self.g);
        ActPtr {
            q: self.q[row * k + k0..].as_ptr(),
            lq: k,
            scale: self.scale[(row * k + k0) / 32..].as_ptr(),
            ls: k / 32,
            sum: self.sum[(row * k + k0) / g..].as_ptr(),
            lg: k / g,
        }
    }
}

/// Up to [`PB`] panels of a weight decoded for [`KC`] values: per panel, the codes (for each 4
/// values, 32 columns of 4 bytes: what one `vpdpbusd` takes for 16 columns, twice), then per group
/// 32 scales and 32 offsets.
struct Band {
    g: usize,
    codes: Aligned<u8>,
    scales: Aligned<f32>,
}

/// One panel of a [`Band`].
#[derive(Clone, Copy)]
struct PanelPtr {
    codes: *const u8,
    scales: *const f32,
}

impl Band {
    fn new(g: usize) -> Self {
        Self {
            g,
            codes: Aligned::zeroed(PB * KC * NR),
            scales: Aligned::zeroed(PB * KC / g * 2 * NR),
        }
    }

    fn panel(&self, i: usize) -> PanelPtr {
        PanelPtr {
            codes: self.codes[i * KC * NR..].as_ptr(),
            scales: self.scales[i * KC / self.g * 2 * NR..].as_ptr(),
        }
    }

    /// Decodes panels p0..p1 of `w` for values k0..k0 + kc (whole blocks); columns past n get
    /// zero codes, scales and offsets.
    fn decode(&mut self, w: &QWeight, p0: usize, p1: usize, k0: usize, kc: usize) {
        let (bs, ts, g) = (w.dtype.block_size(), w.dtype.type_size(), self.g);
        let row_bytes = w.row_bytes();
        let mut block = Decoded::default();
        for (i, p) in (p0..p1).enumerate() {
            let codes = &mut self.codes[i * KC * NR..(i + 1) * KC * NR];
            let scales = &mut self.scales[i * KC / g * 2 * NR..(i + 1) * KC / g * 2 * NR];
            for col in 0..NR {
                let j = p * NR + col;
                for b in 0..kc / bs {
                    let at = k0 + b * bs;
                    if j < w.n {
                        let start = j * row_bytes + at / bs * ts;
                        decode_block(w.dtype, &w.bytes[start..start + ts], &mut block);
                    } else {
                        block = Decoded::default();
                    }
                    for v in (0..bs).step_by(4) {
                        let at = (b * bs + v) * NR + col * 4;
                        codes[at..at + 4].copy_from_slice(&block.codes[v..v + 4]);
                    }
                    for gi in 0..bs / g {
                        let at = (b * bs / g + gi) * 2 * NR + col;
                        scales[at] = block.scale[gi];
                        scales[at + NR] = block.offset[gi];
                    }
                }
            }
        }
    }
}

/// One block decoded: its values as codes (value order), and per group `value = scale * code +
/// offset`.
#[derive(Clone, Copy)]
struct Decoded {
    codes: [u8; 256],
    scale: [f32; 16],
    offset: [f32; 16],
}

impl Default for Decoded {
    fn default() -> Self {
        Self {
            codes: [0; 256],
            scale: [0.0; 16],
            offset: [0.0; 16],
        }
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A K type's 6-bit scale and min `j` of 8, from its 12 packed bytes (GGML's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Decodes one block of `dtype` (its `type_size()` bytes, in GGML's layout) into `out`: codes in
/// value order, and the scale and offset of each group of [`group`] values.
fn decode_block(dtype: GgmlDType, b: &[u8], out: &mut Decoded) {
    use GgmlDType as T;
    let (c, sc, of) = (&mut out.codes, &mut out.scale, &mut out.offset);
    match dtype {
        T::Q8_0 => {
            // value = d * q, q signed: the code is q + 128.
            let d = half(b, 0);
            for (c, &q) in c.iter_mut().zip(&b[2..34]) {
                *c = q ^ 0x80;
            }
            (sc[0], of[0]) = (d, -128.0 * d);
        }
        T::Q4_0 | T::Q4_1 => {
            // value = d * (q - 8), or d * q + m.
            let d = half(b, 0);
            let (qs, m) = match dtype {
                T::Q4_0 => (&b[2..18], -8.0 * d),
                _ => (&b[4..20], half(b, 2)),
            };
            for (j, &q) in qs.iter().enumerate() {
                c[j] = q & 0x0F;
                c[j + 16] = q >> 4;
            }
            (sc[0], of[0]) = (d, m);
        }
        T::Q5_0 | T::Q5_1 => {
            // The fifth bit of value j is bit j of qh.
            let d = half(b, 0);
            let (h, qs, m) = match dtype {
                T::Q5_0 => (2, &b[6..22], -16.0 * d),
                _ => (4, &b[8..24], half(b, 2)),
            };
            let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
            for (j, &q) in qs.iter().enumerate() {
                c[j] = (q & 0x0F) | ((((qh >> j) << 4) & 0x10) as u8);
                c[j + 16] = (q >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
            }
            (sc[0], of[0]) = (d, m);
        }
        T::Q2K => {
            // scales[16] (scale low nibble, min high), qs[64], d, dmin: 16 groups of 16 values,
            // two bits each; per 128 values, 32 bytes of qs hold four 2-bit planes.
            let (d, dmin) = (half(b, 80), half(b, 82));
            let qs = &b[16..80];
            for h in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        c[h * 128 + j * 32 + l] = (qs[h * 32 + l] >> (2 * j)) & 3;
                    }
                }
            }
            for (i, &s) in b[..16].iter().enumerate() {
                sc[i] = d * (s & 0x0F) as f32;
                of[i] = -(dmin * (s >> 4) as f32);
            }
        }
        T::Q3K => {
            // hmask[32], qs[64], scales[12] (16 6-bit scales, biased by 32), d: value =
            // d * (scale - 32) * (two bits - (high bit clear ? 4 : 0)); the code is that + 4.
            let (hmask, qs) = (&b[..32], &b[32..96]);
            let d = half(b, 108);
            let s = &b[96..108];
            for (i, (sc, of)) in sc.iter_mut().zip(of.iter_mut()).enumerate() {
                let low = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
                let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
                let scale = d * ((low | (high << 4)) as f32 - 32.0);
                (*sc, *of) = (scale, -4.0 * scale);
            }
            for h in 0..2 {
                for j in 0..4 {
                    let bit = 1u8 << (4 * h + j);
                    for l in 0..32 {
                        let two = (qs[h * 32 + l] >> (2 * j)) & 3;
                        let hi = if hmask[l] & bit != 0 { 4 } else { 0 };
                        c[h * 128 + j * 32 + l] = two + hi;
                    }
                }
            }
        }
        T::Q4K | T::Q5K => {
            // d, dmin, scales[12] (8 6-bit scales and mins), [qh[32],] qs[128]: per 64 values,
            // 32 bytes whose low nibbles are the first 32 values and high nibbles the next.
            let (d, dmin) = (half(b, 0), half(b, 2));
            let s = &b[4..16];
            let (qh, qs) = match dtype {
                T::Q4K => (None, &b[16..144]),
                _ => (Some(&b[16..48]), &b[48..176]),
            };
            for j in 0..4 {
                for l in 0..32 {
                    let q = qs[j * 32 + l];
                    let (h0, h1) = match qh {
                        Some(qh) => (
                            ((qh[l] >> (2 * j)) & 1) << 4,
                            ((qh[l] >> (2 * j + 1)) & 1) << 4,
                        ),
                        None => (0, 0),
                    };
                    c[j * 64 + l] = (q & 0x0F) | h0;
                    c[j * 64 + 32 + l] = (q >> 4) | h1;
                }
            }
            for i in 0..8 {
                let (s, m) = scale_min_k4(i, s);
                sc[i] = d * s as f32;
                of[i] = -(dmin * m as f32);
            }
        }
        T::Q6K => {
            // ql[128], qh[64], scales[16] (i8), d: value = d * scale * (6 bits - 32); the code is
            // the 6 bits.
            let (ql, qh) = (&b[..128], &b[128..192]);
            let d = half(b, 208);
            for h in 0..2 {
                let (ql, qh) = (&ql[h * 64..], &qh[h * 32..]);
                let y = &mut c[h * 128..];
                for l in 0..32 {
                    y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for (i, &s) in b[192..208].iter().enumerate() {
                sc[i] = d * (s as i8) as f32;
                of[i] = -32.0 * sc[i];
            }
        }
        other => unreachable!("{other:?} is refused by QWeight::new"),
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{ActPtr, PanelPtr, Source, NR};
    use std::arch::x86_64::*;

    /// Quantizes one row `x` (k values) to 8 bits per 32 values: `q = round(x / d)` with
    /// `d = max |x| / 127` (GGML's Q8_0), `scale` the d of each 32, `sum` each group of g values'
    /// Σ q · d.
    ///
    /// # Safety
    /// AVX-512F and BW available; `q` holds k values, `scale` k / 32, `sum` k / g, k a multiple
    /// of 32 and g 16 or 32.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row<S: Source>(
        x: &[S],
        q: &mut [i8],
        scale: &mut [f32],
        sum: &mut [f32],
        g: usize,
    ) {
        // SAFETY: each block reads 32 values of x and writes 32 of q, within the row (# Safety).
        unsafe {
            for (b, d_out) in scale.iter_mut().enumerate() {
                let (x0, x1) = if S::BF16 {
                    let p = x.as_ptr().add(b * 32) as *const __m256i;
                    let widen =
                        |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)));
                    (
                        widen(_mm256_loadu_si256(p)),
                        widen(_mm256_loadu_si256(p.add(1))),
                    )
                } else {
                    let p = x.as_ptr().add(b * 32) as *const f32;
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
                let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
                let out = q.as_mut_ptr().add(b * 32) as *mut __m128i;
                _mm_storeu_si128(out, _mm512_cvtsepi32_epi8(q0));
                _mm_storeu_si128(out.add(1), _mm512_cvtsepi32_epi8(q1));
                *d_out = d;
                let (s0, s1) = (
                    _mm512_reduce_add_epi32(q0) as f32,
                    _mm512_reduce_add_epi32(q1) as f32,
                );
                if g == 16 {
                    sum[2 * b] = s0 * d;
                    sum[2 * b + 1] = s1 * d;
                } else {
                    sum[b] = (s0 + s1) * d;
                }
            }
        }
    }

    /// [`micro`] for `rows` (1..=4) rows and groups of `g` (16 or 32) values.
    ///
    /// # Safety
    /// As [`micro`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        rows: usize,
        g: usize,
        a: ActPtr,
        w: PanelPtr,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        load: bool,
        bias: *const f32,
    ) {
        // SAFETY: forwarded (# Safety).
        unsafe {
            match (rows, g) {
                (4, 32) => micro::<4, 32>(a, w, kc, c, ldc, cols, load, bias),
                (3, 32) => micro::<3, 32>(a, w, kc, c, ldc, cols, load, bias),
                (2, 32) => micro::<2, 32>(a, w, kc, c, ldc, cols, load, bias),
                (1, 32) => micro::<1, 32>(a, w, kc, c, ldc, cols, load, bias),
                (4, 16) => micro::<4, 16>(a, w, kc, c, ldc, cols, load, bias),
                (3, 16) => micro::<3, 16>(a, w, kc, c, ldc, cols, load, bias),
                (2, 16) => micro::<2, 16>(a, w, kc, c, ldc, cols, load, bias),
                (1, 16) => micro::<1, 16>(a, w, kc, c, ldc, cols, load, bias),
                _ => unreachable!("rows 1..=4, groups of 16 or 32"),
            }
        }
    }

    /// `c[0..R, 0..cols] (+)= Σ over kc values of a · w (+ bias)`: R activation rows against one
    /// decoded panel of 32 weight rows, integer dot products per group of G values scaled into
    /// f32 accumulators.
    ///
    /// # Safety
    /// AVX-512F, BW and VNNI available. `a` points at R rows of kc quantized values (and their
    /// kc / 32 scales and kc / G sums); `w` at a panel decoded for kc values in groups of G
    /// (64-byte aligned); `c` is valid for reads and writes of R rows of `cols` (<= 32) floats at
    /// stride ldc (masked access); `bias` is null or valid for `cols` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn micro<const R: usize, const G: usize>(
        a: ActPtr,
        w: PanelPtr,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        load: bool,
        bias: *const f32,
    ) {
        // SAFETY: every pointer stays within the extents of # Safety; masks bound c and bias.
        unsafe {
            let (m0, m1) = super::super::rows32::masks(cols);
            let mut acc = super::super::rows32::start::<R>(load, R, c, ldc);
            for grp in 0..kc / G {
                let mut dot = [[_mm512_setzero_si512(); 2]; R];
                for t in 0..G / 4 {
                    let kk = grp * G + t * 4;
                    let wp = w.codes.add(kk * NR) as *const __m512i;
                    let (w0, w1) = (_mm512_load_si512(wp), _mm512_load_si512(wp.add(1)));
                    for (r, dot) in dot.iter_mut().enumerate() {
                        let q = (a.q.add(r * a.lq + kk) as *const i32).read_unaligned();
                        let q = _mm512_set1_epi32(q);
                        dot[0] = _mm512_dpbusd_epi32(dot[0], w0, q);
                        dot[1] = _mm512_dpbusd_epi32(dot[1], w1, q);
                    }
                }
                let s = w.scales.add(grp * 2 * NR);
                let (s0, s1) = (_mm512_load_ps(s), _mm512_load_ps(s.add(16)));
                let (o0, o1) = (_mm512_load_ps(s.add(32)), _mm512_load_ps(s.add(48)));
                for r in 0..R {
                    let d = _mm512_set1_ps(*a.scale.add(r * a.ls + grp * G / 32));
                    let sum = _mm512_set1_ps(*a.sum.add(r * a.lg + grp));
                    let acc = &mut acc[r];
                    let dot = &dot[r];
                    acc[0] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0]), _mm512_mul_ps(s0, d), acc[0]);
                    acc[1] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[1]), _mm512_mul_ps(s1, d), acc[1]);
                    acc[0] = _mm512_fmadd_ps(o0, sum, acc[0]);
                    acc[1] = _mm512_fmadd_ps(o1, sum, acc[1]);
                }
            }
            super::super::rows32::finish(&mut acc, R, c, ldc, (m0, m1), bias, load);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{ActPtr, PanelPtr, Source};

    /// # Safety
    /// Never called: [`super::available`] is false off x86_64.
    pub(super) unsafe fn quantize_row<S: Source>(
        _: &[S],
        _: &mut [i8],
        _: &mut [f32],
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!("VNNI exists only on x86_64")
    }

    /// # Safety
    /// Never called: [`super::available`] is false off x86_64.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        _: usize,
        _: usize,
        _: ActPtr,
        _: PanelPtr,
        _: usize,
        _: *mut f32,
        _: usize,
        _: usize,
        _: bool,
        _: *const f32,
    ) {
        unreachable!("VNNI exists only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Module, Tensor};

    const TYPES: [GgmlDType; 10] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// n x k Normal values quantized by candle (GGML's quantizers): the blocks and candle's
    /// dequantization of them.
    fn quantized(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let w = crate::cpu::normal_tensor((n, k), 0.5, seed);
        let q = QTensor::quantize(&w, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (q.data().unwrap().into_owned(), deq)
    }

    /// Every type decodes to codes, scales and offsets whose values are candle's dequantization
    /// (GGML's, itself checked against the `gguf` package in tests/gguf.rs), up to the rounding
    /// of `scale * code + offset` against GGML's order of operations.
    #[test]
    fn blocks_decode_to_ggmls_values() {
        for dtype in TYPES {
            let (bs, ts, g) = (dtype.block_size(), dtype.type_size(), group(dtype).unwrap());
            let (bytes, deq) = quantized(dtype, 8, 512, 3);
            let mut out = Decoded::default();
            for (b, block) in bytes.chunks_exact(ts).enumerate() {
                decode_block(dtype, block, &mut out);
                for v in 0..bs {
                    let (s, o) = (out.scale[v / g], out.offset[v / g]);
                    let got = s * out.codes[v] as f32 + o;
                    let want = deq[b * bs + v];
                    let tol = 1e-6 * (s.abs() * 64.0 + o.abs());
                    assert!(
                        (got - want).abs() <= tol,
                        "{dtype:?} block {b} value {v}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The activations as the kernel quantizes them (Q8_0: per 32 values d = max|x| / 127, q =
    /// round-half-even(x · (1 / d))), as f64 values q · d.
    fn q8(x: &[f32]) -> Vec<f64> {
        x.chunks(32)
            .flat_map(|c| {
                let d = c.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                c.iter().map(move |&v| {
                    (v * id).round_ties_even().clamp(-128.0, 127.0) as f64 * d as f64
                })
            })
            .collect()
    }

    /// The product against f64 sums of the same quantized activations and the dequantized
    /// weight: only the order of f32 sums differs. Shapes cover partial row groups, partial
    /// panels, several bands of KC values and a last band shorter than KC; f32 and bf16 inputs.
    #[test]
    fn product_equals_the_sums_of_the_quantized_operands() {
        if !crate::cpu::test_has("vnni") {
            return;
        }
        for dtype in TYPES {
            let bs = dtype.block_size();
            for &(m, n, k) in &[
                (1usize, 33usize, 256usize),
                (7, 70, 768),
                (130, 32, 1280),
                (4, 1, 512),
            ] {
                let k = k.next_multiple_of(bs);
                let (bytes, deq) = quantized(dtype, n, k, 5);
                let w = QWeight::new(dtype, n, k, bytes).unwrap();
                let x = crate::cpu::lcg_normal(m * k, 1.0, 6);
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
                let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                let xw: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                for (bf, xs) in [(false, &x), (true, &xw)] {
                    let mut out = vec![f32::NAN; m * n];
                    match bf {
                        false => matmul(&x, m, &w, Some(&bias), &mut out),
                        true => matmul(&xb, m, &w, Some(&bias), &mut out),
                    }
                    let a = q8(xs);
                    let wd: Vec<f64> = deq.iter().map(|&v| v as f64).collect();
                    let want = crate::cpu::reference_product(&a, m, k, &wd, n, k);
                    for i in 0..m {
                        let scale = (0..n).map(|j| want[i * n + j].abs()).fold(1.0f64, f64::max);
                        for j in 0..n {
                            let (got, want) =
                                (out[i * n + j] as f64, want[i * n + j] + bias[j] as f64);
                            assert!(
                                (got - want).abs() <= 2e-5 * scale * (k as f64 / 256.0).sqrt(),
                                "{dtype:?} {m}x{n}x{k} bf16 {bf}, ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against the unquantized product, the error is what 8-bit activations and the type's grid
    /// cost (small for 8 bits, larger for 2), and no more than GGML's own kernels make (candle's,
    /// which quantize the activations per 256 values for the K types).
    #[test]
    fn product_is_close_to_the_float_product() {
        if !crate::cpu::test_has("vnni") {
            return;
        }
        let (m, n, k) = (16, 64, 1024);
        let x = crate::cpu::lcg_normal(m * k, 1.0, 8);
        let wf = crate::cpu::normal_tensor((n, k), 0.5, 9);
        let exact = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
            .unwrap()
            .matmul(&wf.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        for (dtype, tol) in [
            (GgmlDType::Q8_0, 0.009),
            (GgmlDType::Q6K, 0.022),
            (GgmlDType::Q5K, 0.045),
            (GgmlDType::Q4K, 0.085),
            (GgmlDType::Q4_0, 0.095),
            (GgmlDType::Q2K, 0.34),
        ] {
            let q = QTensor::quantize(&wf, dtype).unwrap();
            let w = QWeight::new(dtype, n, k, q.data().unwrap().into_owned()).unwrap();
            let mut out = vec![0f32; m * n];
            matmul(&x, m, &w, None, &mut out);
            let diff: Vec<f32> = out.iter().zip(&exact).map(|(a, b)| a - b).collect();
            let err = rms(&diff) / rms(&exact);
            let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diff: Vec<f32> = theirs.iter().zip(&exact).map(|(a, b)| a - b).collect();
            let ggml = rms(&diff) / rms(&exact);
            assert!(
                err < tol && err <= 1.02 * ggml,
                "{dtype:?}: relative RMS error {err}, GGML's (candle's kernels) {ggml}"
            );
        }
    }

    #[test]
    fn weights_that_do_not_fit_are_refused_by_name() {
        let e = QWeight::new(GgmlDType::F16, 2, 32, vec![0; 128]).unwrap_err();
        assert!(e.contains("F16"), "{e}");
        let e = QWeight::new(GgmlDType::Q4K, 2, 128, vec![0; 144]).unwrap_err();
        assert!(e.contains("not whole"), "{e}");
        let e = QWeight::new(GgmlDType::Q8_0, 2, 64, vec![0; 135]).unwrap_err();
        assert!(e.contains("136 bytes, given 135"), "{e}");
    }
}
