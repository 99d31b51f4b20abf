//! 2-D convolution (stride 1, square kernel, zero padding) in f32 on the CPU, for the VAE decoder.
//!
//! candle's CPU convolution copies the input into an im2col matrix (k² times the input: 1.2 GB for
//! a 3x3 convolution over 128 channels at 512²) and multiplies that. Here the image is copied, one
//! band of rows at a time, into a zero-padded channels-last layout, and the output is the sum over
//! the k² kernel taps of products of that band, read from shifted starts, with the tap's
//! (c_in x c_out) weights ([`sgemm::matmul_taps`]). Output rows run over the padded width, so the
//! padding columns of each row are computed and dropped when the result is written back
//! channels-first. Beyond the input and output, a call holds about 64 MiB.

use super::sgemm::{self, PackedF32};
use super::OutPtr;
use rayon::prelude::*;

/// A convolution's weights packed per tap.
#[derive(Debug, Clone)]
pub struct Conv2dF32 {
    cin: usize,
    cout: usize,
    ksize: usize,
    pad: usize,
    taps: Vec<PackedF32>,
    bias: Option<Vec<f32>>,
}

impl Conv2dF32 {
    /// From PyTorch's weight layout (c_out, c_in, k, k) and an optional bias (c_out).
    /// Panics if [`sgemm::available`] is false or the lengths do not match.
    pub fn new(
        weight: &[f32],
        bias: Option<Vec<f32>>,
        cout: usize,
        cin: usize,
        ksize: usize,
        pad: usize,
    ) -> Self {
        assert_eq!(weight.len(), cout * cin * ksize * ksize, "weight length");
        if let Some(b) = &bias {
            assert_eq!(b.len(), cout, "bias length");
        }
        let kk = ksize * ksize;
        let taps = (0..kk)
            .map(|t| {
                let w: Vec<f32> = (0..cout * cin).map(|oi| weight[oi * kk + t]).collect();
                PackedF32::from_nk(&w, cout, cin)
            })
            .collect();
        Self {
            cin,
            cout,
            ksize,
            pad,
            taps,
            bias,
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

    /// x: (b, c_in, h, w) row-major -> (b, c_out, h', w'). Panics on a length mismatch or a kernel
    /// larger than the padded image (callers check [`Self::output_size`]).
    pub fn forward(&self, x: &[f32], b: usize, h: usize, w: usize) -> Vec<f32> {
        let (cin, cout, k, p) = (self.cin, self.cout, self.ksize, self.pad);
        assert_eq!(x.len(), b * cin * h * w, "input length");
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
        // elements past them (garbage columns, dropped).
        let mut img = vec![0f32; ((band + k - 1) * wp + k) * cin];
        let mut prod = vec![0f32; band * wp * cout];
        let offsets: Vec<usize> = (0..k * k).map(|t| (t / k * wp + t % k) * cin).collect();
        let plane = ho * wo;
        for (x, out) in x.chunks(cin * h * w).zip(out.chunks_mut(cout * plane)) {
            for y0 in (0..ho).step_by(band) {
                let rows = band.min(ho - y0);
                // Padded rows y0 .. y0 + rows + k - 1, channels-last.
                img.par_chunks_mut(wp * cin)
                    .take(rows + k - 1)
                    .enumerate()
                    .for_each(|(i, row)| {
                        row.fill(0.0);
                        let yp = y0 + i;
                        if yp < p || yp >= h + p {
                            return;
                        }
                        let y = yp - p;
                        for c in 0..cin {
                            let src = &x[(c * h + y) * w..][..w];
                            for (xx, &v) in src.iter().enumerate() {
                                row[(xx + p) * cin + c] = v;
                            }
                        }
                    });
                let m = rows * wp;
                sgemm::matmul_taps(
                    &img,
                    &offsets,
                    m,
                    cin,
                    &self.taps,
                    self.bias.as_deref(),
                    &mut prod[..m * cout],
                    cout,
                );
                // Back to channels-first, dropping the padding columns.
                let optr = OutPtr(out.as_mut_ptr());
                prod[..m * cout]
                    .par_chunks(wp * cout)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let y = y0 + i;
                        for xx in 0..wo {
                            let px = &row[xx * cout..][..cout];
                            for (o, &v) in px.iter().enumerate() {
                                // SAFETY: (o, y, xx) indexes out; each task writes its own row y.
                                unsafe { *optr.get().add(o * plane + y * wo + xx) = v };
                            }
                        }
                    });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's conv2d (im2col) on odd sizes, 3x3 with padding 1 and 1x1 without, batch 2.
    #[test]
    fn conv_equals_candles() {
        if !crate::cpu::test_has("avx512") {
            return;
        }
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
            let want = x
                .conv2d(&wt, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let conv = Conv2dF32::new(
                &wt.flatten_all().unwrap().to_vec1().unwrap(),
                Some(bias.to_vec1().unwrap()),
                cout,
                cin,
                k,
                p,
            );
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = conv.forward(&xs, b, h, w);
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                assert!((g - v).abs() <= 1e-5 * (1.0 + v.abs()), "{i}: {g} vs {v}");
            }
        }
    }
}
