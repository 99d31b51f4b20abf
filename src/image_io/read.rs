//! Reading an input image: the format from the file's content, the size checked against the limits
//! from the header before any pixel is decoded, EXIF orientation applied, alpha flattened on white,
//! grayscale, CMYK and 16-bit inputs converted to 8-bit RGB.

use crate::error::{Error, Param, Result};
use crate::output::RgbImage;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use std::path::Path;

/// Longest side of an input image, in pixels.
pub const MAX_SIDE: u32 = 16384;
/// Largest decoded input image, in bytes (256 MiB).
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// Reads `path` (PNG, JPEG or WebP) as 8-bit RGB; `what` names the parameter in errors.
pub fn read_rgb(path: &Path, what: Param) -> Result<RgbImage> {
    let shown = path.display().to_string();
    let bad = |rest: String| Error::invalid(what, format!(" {shown}: {rest}"));
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("no such file".into()),
        _ => bad(format!("cannot read it ({e})")),
    })?;
    if meta.is_dir() {
        return Err(bad("is a folder; name an image file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    decode(std::io::BufReader::new(file), &shown, what)
}

/// [`read_rgb`] for an image's bytes (an upload); `name` is how errors call it.
pub fn read_rgb_bytes(bytes: &[u8], name: &str, what: Param) -> Result<RgbImage> {
    decode(std::io::Cursor::new(bytes), name, what)
}

fn decode(
    source: impl std::io::BufRead + std::io::Seek,
    shown: &str,
    what: Param,
) -> Result<RgbImage> {
    let bad = |rest: String| Error::invalid(what, format!(" {shown}: {rest}"));
    let mut reader = ImageReader::new(source)
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read it ({e})")))?;
    let not_image = || bad("is not a PNG, JPEG or WebP image".into());
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        _ => return Err(not_image()),
    }
    // The header alone is read here; the limits are checked on it before pixels are decoded.
    reader.no_limits();
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("is not a readable image ({e})")))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(bad(format!("is {w}x{h} pixels; it has no pixels")));
    }
    if w > MAX_SIDE || h > MAX_SIDE || decoder.total_bytes() > MAX_DECODED_BYTES {
        return Err(bad(format!(
            "is {w}x{h} pixels, more than accepted (at most {MAX_SIDE} a side and {} MiB decoded); scale it down first",
            MAX_DECODED_BYTES >> 20
        )));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(2 * MAX_DECODED_BYTES);
    decoder
        .set_limits(limits)
        .map_err(|e| bad(format!("cannot be decoded within the limits ({e})")))?;
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad(format!("is damaged or truncated ({e})")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(to_rgb(&img))
}

/// 8-bit RGB; an alpha channel is composited over white.
fn to_rgb(img: &DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for p in rgba.pixels() {
            let a = u32::from(p[3]);
            for c in 0..3 {
                let v = (u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255;
                out.push(v as u8);
            }
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
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
    fn alpha_is_flattened_on_white_and_gray_is_expanded() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([100, 0, 200, 255]));
        let out = to_rgb(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(out.data, vec![255, 255, 255, 100, 0, 200]);
        let gray = image::GrayImage::from_raw(1, 1, vec![42]).unwrap();
        assert_eq!(
            to_rgb(&DynamicImage::ImageLuma8(gray)).data,
            vec![42, 42, 42]
        );
        let deep =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![65535u16, 0, 32896])
                .unwrap();
        assert_eq!(
            to_rgb(&DynamicImage::ImageRgb16(deep)).data,
            vec![255, 0, 128]
        );
    }
}
