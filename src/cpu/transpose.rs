//! f32 transposes on AVX-512 in 16 x 16 blocks held in registers: the layout changes around the
//! packed kernels (sgemm's micro-panels of A and panels of B, a convolution's channels-last band
//! and its way back).

#[cfg(target_arch = "x86_64")]
use super::low_lanes;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The 16 x 16 transpose of 16 vectors: column c of the rows as vector c. Register shuffles only;
/// callers enable AVX-512F (`#[target_feature]`), into which this inlines.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: register shuffles only; AVX-512F is enabled in every caller.
    unsafe {
        // Pairs of rows interleaved: in each 128-bit lane L, (r0[4L], r1[4L], r0[4L+1], r1[4L+1])
        // and the same of 4L+2, 4L+3.
        let t: [__m512; 16] = std::array::from_fn(|i| match i % 2 {
            0 => _mm512_unpacklo_ps(r[i], r[i + 1]),
            _ => _mm512_unpackhi_ps(r[i - 1], r[i]),
        });
        // u[4g + j], lane L: rows 4g .. 4g + 4 of column 4L + j.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + j / 2], t[4 * g + 2 + j / 2]);
            match j % 2 {
                0 => _mm512_shuffle_ps::<0x44>(a, b),
                _ => _mm512_shuffle_ps::<0xEE>(a, b),
            }
        });
        // Column 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let (a0, a1, a2, a3) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
            let p = _mm512_shuffle_f32x4::<0x44>(a0, a1); // a0.0 a0.1 a1.0 a1.1
            let q = _mm512_shuffle_f32x4::<0xEE>(a0, a1); // a0.2 a0.3 a1.2 a1.3
            let r = _mm512_shuffle_f32x4::<0x44>(a2, a3);
            let s = _mm512_shuffle_f32x4::<0xEE>(a2, a3);
            out[j] = _mm512_shuffle_f32x4::<0x88>(p, r);
            out[4 + j] = _mm512_shuffle_f32x4::<0xDD>(p, r);
            out[8 + j] = _mm512_shuffle_f32x4::<0x88>(q, s);
            out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(q, s);
        }
        out
    }
}

/// `dst[c ldd + r] = src[r lds + c]` for r < rows, c < cols: a rows x cols matrix (row stride lds)
/// written as cols x rows (row stride ldd), each of dst's rows `width` (>= rows) long, zeros after
/// the first `rows` (sgemm's micro-panels of A, whose last group is short).
///
/// # Safety
/// AVX-512F available; `src` valid for reads of `cols` floats at `src + r lds` for r < rows; `dst`
/// valid for writes of `width` floats at `dst + c ldd` for c < cols, not overlapping src.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose(
    src: *const f32,
    lds: usize,
    (rows, cols): (usize, usize),
    dst: *mut f32,
    ldd: usize,
    width: usize,
) {
    debug_assert!(width >= rows);
    // SAFETY: the masked loads read columns c0 .. c0 + cn < cols of rows r0 + i < rows only (masked
    // lanes are not accessed); the masked stores write r0 .. r0 + wn <= width values of the rows
    // c0 + j < cols of dst only.
    unsafe {
        for r0 in (0..width).step_by(16) {
            let wn = 16.min(width - r0);
            for c0 in (0..cols).step_by(16) {
                let cn = 16.min(cols - c0);
                let block: [__m512; 16] = std::array::from_fn(|i| match r0 + i < rows {
                    true => _mm512_maskz_loadu_ps(low_lanes(cn), src.add((r0 + i) * lds + c0)),
                    false => _mm512_setzero_ps(),
                });
                let t = transpose16(block);
                for (j, v) in t.iter().enumerate().take(cn) {
                    _mm512_mask_storeu_ps(dst.add((c0 + j) * ldd + r0), low_lanes(wn), *v);
                }
            }
        }
    }
}

/// # Safety
/// Never called: the AVX-512 kernels are unavailable off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn transpose(
    _: *const f32,
    _: usize,
    _: (usize, usize),
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("AVX-512 exists only on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value in its place, the padding rows zero, nothing past `width` written, for sizes
    /// around the 16-value blocks and strides beyond the rows.
    #[test]
    fn transpose_places_every_value() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let mut seed = 5;
        for rows in [1usize, 7, 14, 16, 17, 40] {
            for cols in [1, 15, 16, 33] {
                for width in [rows, rows + 1, rows.next_multiple_of(14)] {
                    let (lds, ldd) = (cols + 3, width + 2);
                    let src = crate::cpu::lcg_uniform(rows * lds, &mut seed, -1.0, 1.0);
                    let mut dst = vec![f32::NAN; cols * ldd];
                    // SAFETY: AVX-512 is available (checked); src holds rows x lds, dst cols x ldd
                    // with ldd >= width.
                    unsafe {
                        transpose(
                            src.as_ptr(),
                            lds,
                            (rows, cols),
                            dst.as_mut_ptr(),
                            ldd,
                            width,
                        )
                    };
                    for c in 0..cols {
                        for r in 0..ldd {
                            let got = dst[c * ldd + r];
                            let at = format!("{rows}x{cols} width {width} [{c},{r}]");
                            match r {
                                r if r < rows => {
                                    assert_eq!(got.to_bits(), src[r * lds + c].to_bits(), "{at}")
                                }
                                r if r < width => assert_eq!(got.to_bits(), 0, "{at}: padding"),
                                _ => assert!(got.is_nan(), "{at}: wrote past the width"),
                            }
                        }
                    }
                }
            }
        }
    }
}
