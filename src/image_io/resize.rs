//! Resizing as diffusers' image processor does it: PIL's `Image.resize(..., LANCZOS)` on 8-bit RGB,
//! reproduced to the byte so that edited images start from the same pixels as in diffusers.
//!
//! PIL resamples in two separable passes (horizontal, then vertical), each with Lanczos-3 weights
//! stretched by the downscaling factor, normalised, turned into 22-bit fixed point, and each pass
//! rounds its output to 8 bits.

use crate::output::RgbImage;

/// Fixed-point fraction bits of PIL's 8-bit resampling weights (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// Lanczos-3 reaches 3 input pixels on each side (scaled up when downscaling).
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

/// One output pixel's source window and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size` -> `out_size` pixels.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, then the window is clipped to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|x| lanczos((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            Taps { first: lo, weights }
        })
        .collect()
}

/// PIL's `clip8`: drop the fraction bits and clamp to a byte.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass over `src` (`rows` x `cols` x 3), resampling along the axis given by the strides.
fn pass(
    src: &[u8],
    n_out: usize,
    n_lines: usize,
    taps: &[Taps],
    at: impl Fn(usize, usize) -> usize,
    out_at: impl Fn(usize, usize) -> usize,
    out_len: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_len];
    let half = 1i64 << (PRECISION_BITS - 1);
    for line in 0..n_lines {
        for (o, t) in taps.iter().enumerate().take(n_out) {
            for c in 0..3 {
                let mut acc = half;
                for (k, &w) in t.weights.iter().enumerate() {
                    acc += i64::from(src[at(line, t.first + k) + c]) * i64::from(w);
                }
                out[out_at(line, o) + c] = clip8(acc);
            }
        }
    }
    out
}

/// The image resized to `width` x `height` exactly as PIL's Lanczos resampling does it; the same
/// image when the size already matches.
pub fn lanczos_resize(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (img.width, img.height);
    let mut data = img.data.clone();
    let mut w = w0;
    if width != w0 {
        let t = taps(w0, width);
        data = pass(
            &data,
            width,
            h0,
            &t,
            |y, x| (y * w0 + x) * 3,
            |y, x| (y * width + x) * 3,
            width * h0 * 3,
        );
        w = width;
    }
    if height != h0 {
        let t = taps(h0, height);
        data = pass(
            &data,
            height,
            w,
            &t,
            |x, y| (y * w + x) * 3,
            |x, y| (y * w + x) * 3,
            w * height * 3,
        );
    }
    RgbImage {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point_and_a_same_size_resize_is_the_identity() {
        for (i, o) in [(37, 32), (16, 48), (100, 7), (5, 5)] {
            for t in taps(i, o) {
                let s: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
        let img = RgbImage {
            width: 3,
            height: 2,
            data: (0..18).map(|v| v as u8 * 13).collect(),
        };
        assert_eq!(lanczos_resize(&img, 3, 2), img);
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let img = RgbImage {
            width: 9,
            height: 5,
            data: [200u8, 10, 77].repeat(45),
        };
        let r = lanczos_resize(&img, 4, 13);
        assert_eq!(r.data, [200u8, 10, 77].repeat(52));
    }
}
