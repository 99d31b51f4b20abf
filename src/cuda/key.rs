//! How `sdpa.cpp` keys its cuDNN attention plans: the inputs' shape and strides as their layouts
//! hold them. Plain data, compiled (and tested) with or without the `cuda` feature.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::Layout;
use std::ffi::c_int;

/// The inputs as `sdpa.cpp` keys its plans: device, dtype, (b, h, n, m, d), the strides of q, k
/// and v in elements, the scale.
pub(super) struct Args {
    pub device: c_int,
    pub dtype: c_int,
    pub shape: [i64; 5],
    pub strides: [i64; 12],
    pub scale: f32,
}

impl Args {
    /// None unless q, k and v are rank 4 with matching (b, h, d), k and v of one length, each last
    /// dimension contiguous, and every start and other stride a multiple of 8 elements (cuDNN's
    /// attention reads 16-byte aligned rows of its 2-byte values).
    pub fn new(device: usize, dtype: c_int, [q, k, v]: [&Layout; 3], scale: f32) -> Option<Self> {
        let (b, h, n, d) = q.shape().dims4().ok()?;
        let (kb, kh, m, kd) = k.shape().dims4().ok()?;
        if (kb, kh, kd) != (b, h, d) || v.shape().dims4().ok()? != (b, h, m, d) {
            return None;
        }
        let mut strides = [0i64; 12];
        for (i, l) in [q, k, v].into_iter().enumerate() {
            let s = l.stride();
            if s[3] != 1 || l.start_offset() % 8 != 0 || s[..3].iter().any(|x| x % 8 != 0) {
                return None;
            }
            for (j, &x) in s.iter().enumerate() {
                strides[4 * i + j] = i64::try_from(x).ok()?;
            }
        }
        let dim = |x: usize| i64::try_from(x).ok();
        Some(Self {
            device: c_int::try_from(device).ok()?,
            dtype,
            shape: [dim(b)?, dim(h)?, dim(n)?, dim(m)?, dim(d)?],
            strides,
            scale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key's shape and strides come from the layouts as they are (a head-split view keeps
    /// its strides); anything cuDNN's tensors cannot describe is refused before any CUDA call.
    #[test]
    fn args_take_the_layouts_strides_and_refuse_what_cudnn_cannot_take() {
        let (b, n, h, d, m) = (2, 5, 3, 16, 7);
        // q as split_heads leaves it without a copy: (b, n, h, d) viewed as (b, h, n, d).
        let q = Layout::contiguous((b, n, h, d)).transpose(1, 2).unwrap();
        let k = Layout::contiguous((b, h, m, d));
        let args = Args::new(0, 1, [&q, &k, &k], 0.5).unwrap();
        assert_eq!(args.shape, [2, 3, 5, 7, 16]);
        let hd = (h * d) as i64;
        let q_strides = [(n * h * d) as i64, d as i64, hd, 1];
        let k_strides = [(h * m * d) as i64, (m * d) as i64, d as i64, 1];
        assert_eq!(args.strides[..4], q_strides);
        assert_eq!(args.strides[4..8], k_strides);
        assert_eq!(args.strides[8..], k_strides);

        // The last dimension strided, mismatched heads or head dims, or k and v of other lengths.
        let strided = Layout::contiguous((b, h, d, n)).transpose(2, 3).unwrap();
        assert!(Args::new(0, 1, [&strided, &k, &k], 0.5).is_none());
        let other_heads = Layout::contiguous((b, h + 1, m, d));
        assert!(Args::new(0, 1, [&q, &other_heads, &other_heads], 0.5).is_none());
        let other_dim = Layout::contiguous((b, h, m, d + 8));
        assert!(Args::new(0, 1, [&q, &other_dim, &other_dim], 0.5).is_none());
        let shorter_v = Layout::contiguous((b, h, m - 1, d));
        assert!(Args::new(0, 1, [&q, &k, &shorter_v], 0.5).is_none());
        assert!(Args::new(0, 1, [&q, &k, &Layout::contiguous((b, h, m))], 0.5).is_none());
        // Rows or starts off 16-byte alignment: a head dim of 12, a view 4 values in.
        let unaligned = Layout::contiguous((b, h, m, 12));
        let q12 = Layout::contiguous((b, h, n, 12));
        assert!(Args::new(0, 1, [&q12, &unaligned, &unaligned], 0.5).is_none());
        let shifted = Layout::contiguous((b, h, m, d + 8))
            .narrow(3, 4, d)
            .unwrap();
        assert!(Args::new(0, 1, [&q, &shifted, &k], 0.5).is_none());
    }
}
