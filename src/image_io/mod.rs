//! Images in: PNG, JPEG and WebP files read with the `image` crate under decoding limits, turned
//! into the 8-bit RGB the pipelines take, and resized as diffusers' image processor does.

mod read;
mod resize;

pub use read::{read_rgb, read_rgb_bytes, MAX_DECODED_BYTES, MAX_SIDE};
pub use resize::lanczos_resize;

/// The `width` x `height` rectangle at the centre of `img` (PIL's `crop` at `((W - w) // 2, (H - h)
/// // 2)`); `width` and `height` must not exceed the image's.
pub fn center_crop(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (left, top) = ((img.width - width) / 2, (img.height - height) / 2);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let at = (y * img.width + left) * 3;
        data.extend_from_slice(&img.data[at..at + width * 3]);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

use crate::output::RgbImage;

/// A pixel mask (`width * height`) at latent resolution, as `F.interpolate(mode="nearest")` takes
/// it for a factor `f`: the pixel at each latent's top-left corner. Row-major, `(width / f) * (height
/// / f)` values.
pub fn mask_at_latents(bits: &[u8], width: usize, height: usize, f: usize) -> Vec<u8> {
    (0..height / f)
        .flat_map(|y| (0..width / f).map(move |x| bits[y * f * width + x * f]))
        .collect()
}

/// An inpainting mask as diffusers' mask processor makes it: resized to `width` x `height` like the
/// image, turned gray as PIL does (`L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`), then 1 where
/// it is at least half white (repaint) and 0 elsewhere (keep). Row-major, `width * height` values.
pub fn binarize_mask(mask: &RgbImage, width: usize, height: usize) -> Vec<u8> {
    let m = lanczos_resize(mask, width, height);
    m.data
        .chunks_exact(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(u32::from);
            let l = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            u8::from(l as f32 / 255.0 >= 0.5)
        })
        .collect()
}
