//! f32 transposes on AVX-512 in 16 x 16 blocks held in registers: the layout changes around the
//! packed kernels (a convolution's channels-last band and its way back; sgemm's micro-panels of A
//! and panels of B use [`transpose16`] directly).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The 16 x 16 transpose of 16 vectors: column c of the rows as vector c. Register shuffles only;
/// callers enable AVX-512F (`#[target_feature]`), into which this inlines.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
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

/// The low `n` (<= 16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as __mmask16
}

/// `dst[c ldd + r] = src[r lds + c]` for r < rows, c < cols: a rows x cols matrix (row stride lds)
/// written as cols x rows (row stride ldd).
///
/// # Safety
/// AVX-512F available; `src` valid for reads of `cols` floats at `src + r lds` for r < rows; `dst`
/// valid for writes of `rows` floats at `dst + c ldd` for c < cols, not overlapping src.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose(
    src: *const f32,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ldd: usize,
) {
    // SAFETY: the masked loads read columns c0 .. c0 + cn < cols of rows r0 + i < rows only (masked
    // lanes are not accessed); the masked stores write rows r0 .. r0 + rn < rows of columns
    // c0 + j < cols only.
    unsafe {
        for r0 in (0..rows).step_by(16) {
            let rn = 16.min(rows - r0);
            for c0 in (0..cols).step_by(16) {
                let cn = 16.min(cols - c0);
                let block: [__m512; 16] = std::array::from_fn(|i| match i < rn {
                    true => _mm512_maskz_loadu_ps(lanes(cn), src.add((r0 + i) * lds + c0)),
                    false => _mm512_setzero_ps(),
                });
                let t = transpose16(block);
                for (j, v) in t.iter().enumerate().take(cn) {
                    _mm512_mask_storeu_ps(dst.add((c0 + j) * ldd + r0), lanes(rn), *v);
                }
            }
        }
    }
}

/// # Safety
/// Never called: the AVX-512 kernels are unavailable off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn transpose(_: *const f32, _: usize, _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX-512 exists only on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value in its place, nothing outside the written block touched, for sizes around the
    /// 16-value blocks and strides beyond the rows.
    #[test]
    fn transpose_places_every_value() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
        let mut seed = 5;
        for rows in [1, 7, 16, 17, 40] {
            for cols in [1, 15, 16, 33] {
                let (lds, ldd) = (cols + 3, rows + 2);
                let src = crate::cpu::lcg_uniform(rows * lds, &mut seed, -1.0, 1.0);
                let mut dst = vec![f32::NAN; cols * ldd];
                // SAFETY: AVX-512 is available (checked); src holds rows x lds, dst cols x ldd.
                unsafe { transpose(src.as_ptr(), lds, rows, cols, dst.as_mut_ptr(), ldd) };
                for c in 0..cols {
                    for r in 0..ldd {
                        let got = dst[c * ldd + r];
                        match r < rows {
                            true => assert_eq!(
                                got.to_bits(),
                                src[r * lds + c].to_bits(),
                                "{rows}x{cols} [{c},{r}]"
                            ),
                            false => assert!(got.is_nan(), "{rows}x{cols}: wrote past the rows"),
                        }
                    }
                }
            }
        }
    }
}
