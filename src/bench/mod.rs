//! Benchmark measures: timing statistics, fidelity metrics, peak memory, and the report formats.

pub mod plot;
pub mod report;

use crate::output::RgbImage;
use candle_core::{DType, Tensor};

/// Median, min and max of a set of durations in seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// None for an empty sample.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// PSNR in dB between two 8-bit images of the same size (infinite when identical).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.data.len(), b.data.len(), "images differ in size");
    let mse = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.data.len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Root-mean-square difference of two latent tensors.
pub fn rmse(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    let ms: f32 = d.sqr()?.mean_all()?.to_scalar()?;
    Ok((ms as f64).sqrt())
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident memory of this process now, in bytes (Linux `VmRSS`), if known.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A size field of `/proc/self/status` (given in kB) in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Lays images out in a grid (rows x cols, row-major), with a 2-pixel white gutter. All images must
/// share one size.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let (w, h) = images.first().map_or((0, 0), |i| (i.width, i.height));
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * w + (cols + 1) * gap, rows * h + (rows + 1) * gap);
    let mut data = vec![255u8; gw * gh * 3];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        let (x0, y0) = (gap + c * (w + gap), gap + r * (h + gap));
        for y in 0..h {
            let src = &img.data[y * w * 3..(y + 1) * w * 3];
            let at = ((y0 + y) * gw + x0) * 3;
            data[at..at + w * 3].copy_from_slice(src);
        }
    }
    RgbImage {
        width: gw,
        height: gh,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_psnr() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        let a = RgbImage {
            width: 1,
            height: 1,
            data: vec![0, 0, 0],
        };
        let b = RgbImage {
            width: 1,
            height: 1,
            data: vec![255, 255, 255],
        };
        assert_eq!(psnr(&a, &b), 0.0);
        assert!(psnr(&a, &a).is_infinite());
        let g = grid(&[a.clone(), b.clone(), a], 2);
        assert_eq!((g.width, g.height), (2 + 3 * 2, 2 + 3 * 2));
    }
}
