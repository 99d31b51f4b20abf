//! Images out: the 8-bit RGB image a pipeline produces, and image files written to a temporary file
//! in the target folder and renamed into place, so an interrupted run leaves nothing half-written.
//! PNG (generation parameters in text chunks), JPEG or WebP, chosen by the file's extension.

use crate::error::{Error, Message, Param, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes, `width * height * 3` of them.
    pub data: Vec<u8>,
}

/// The file formats images are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// With the generation parameters as text chunks (what `--from` reads).
    Png,
    /// Quality [`JPEG_QUALITY`] in files (a server's request may ask another); no metadata.
    Jpeg,
    /// Lossless; no metadata.
    WebP,
}

/// How images are encoded: the file format, and JPEG's quality (1-100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub format: Format,
    pub quality: u8,
}

impl Encoding {
    /// `img` as the bytes of a file in this encoding: a PNG with `text` key/value chunks, a JPEG
    /// of `quality` (1-100; 0 is taken as 1) or a lossless WebP (the last two carry no text).
    pub fn bytes(self, img: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        encode(&mut out, img, self.format, self.quality, text)?;
        Ok(out)
    }
}

/// JPEG's quality where none is asked for (`generate`'s files).
pub const JPEG_QUALITY: u8 = 95;

impl Format {
    /// The media type an HTTP answer names.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }

    /// The format's name as OpenAI's `output_format` spells it (also a file extension).
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::WebP => "webp",
        }
    }

    /// From the path's extension (case-insensitive); no extension means PNG.
    pub fn of(path: &Path) -> Option<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        ext.map_or(Some(Self::Png), |e| Self::named(&e))
    }

    /// From its name or extension: `png`, `jpeg` or `jpg`, `webp` (lowercase).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::WebP),
            _ => None,
        }
    }
}

/// Checks that `path` can be written, before any heavy work: a known extension, its folder exists and
/// is writable, it is not a symlink, and it does not exist unless `overwrite`.
pub fn check_output_path(path: &Path, overwrite: bool) -> Result<()> {
    let shown = path.display();
    let bad = |rest: String| Error::invalid(Param::Output, format!(" {shown}: {rest}"));
    if Format::of(path).is_none() {
        return Err(bad(
            "unknown image extension; name a .png (with the generation parameters), .jpg or .webp file".into(),
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            return Err(bad("is a symbolic link; name a regular file".into()));
        }
        if meta.is_dir() {
            return Err(bad("is a folder; name a .png file inside it".into()));
        }
        if !overwrite {
            return Err(Error::InvalidRequest(
                Message::about(Param::Output)
                    .text(format!(" {shown}: already exists; pass "))
                    .param(Param::Overwrite)
                    .text(" to replace it"),
            ));
        }
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(bad(format!(
            "folder {} does not exist; create it first",
            dir.display()
        )));
    }
    // A folder marked read-only is respected even by root, who could write there anyway.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(&dir) {
            if m.permissions().mode() & 0o222 == 0 {
                return Err(bad(format!(
                    "folder {} is read-only; choose a writable folder",
                    dir.display()
                )));
            }
        }
    }
    // Prove the folder is writable with the same kind of temporary file the real write uses.
    let probe = temp_path(path);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(bad(format!(
            "cannot write in {} ({e}); choose a writable folder",
            dir.display()
        ))),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(format!(".{name}.{}.partial", std::process::id()))
}

/// Writes `img` in the format of `path`'s extension ([`Format::of`]; `text` goes into a PNG's
/// chunks, other formats carry none) and moves it into place atomically.
pub fn write_image(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    match Format::of(path) {
        Some(f) => write_atomically(path, |w| encode(w, img, f, JPEG_QUALITY, text)),
        None => Err(Error::invalid(
            Param::Output,
            format!(
                " {}: unknown image extension; name a .png, .jpg or .webp file",
                path.display()
            ),
        )),
    }
}

/// Encodes `img` as PNG with `text` key/value chunks and moves it to `path` atomically.
pub fn write_png(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    write_atomically(path, |buf| encode_png(buf, img, text))
}

/// `img` as the bytes of a PNG with `text` key/value chunks.
pub fn png_bytes(img: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    let png = Encoding {
        format: Format::Png,
        quality: JPEG_QUALITY,
    };
    png.bytes(img, text)
}

fn encode(
    w: impl Write,
    img: &RgbImage,
    format: Format,
    quality: u8,
    text: &[(String, String)],
) -> Result<()> {
    use image::ImageEncoder;
    let (w_px, h_px) = (img.width as u32, img.height as u32);
    let rgb = image::ExtendedColorType::Rgb8;
    let r = match format {
        Format::Png => return encode_png(w, img, text),
        Format::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(w, quality.clamp(1, 100))
                .write_image(&img.data, w_px, h_px, rgb)
        }
        Format::WebP => image::codecs::webp::WebPEncoder::new_lossless(w)
            .write_image(&img.data, w_px, h_px, rgb),
    };
    r.map_err(|e| Error::Image(e.to_string()))
}

fn encode_png(w: impl Write, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    let mut enc = png::Encoder::new(w, img.width as u32, img.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        enc.add_itxt_chunk(k.clone(), v.clone())
            .map_err(|e| Error::Image(e.to_string()))?;
    }
    let mut w = enc
        .write_header()
        .map_err(|e| Error::Image(e.to_string()))?;
    w.write_image_data(&img.data)
        .map_err(|e| Error::Image(e.to_string()))?;
    w.finish().map_err(|e| Error::Image(e.to_string()))
}

/// Runs `encode` into a temporary file beside `path`, syncs it and renames it to `path`; removes the
/// temporary file on any failure.
fn write_atomically(
    path: &Path,
    encode: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut buf = std::io::BufWriter::new(&file);
        encode(&mut buf)?;
        buf.flush().map_err(|e| Error::io(&tmp, e))?;
        drop(buf);
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Reads an 8-bit RGB PNG and its text chunks.
pub fn read_png(path: &Path) -> Result<(RgbImage, Vec<(String, String)>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = dec
        .read_info()
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(Error::Image(format!(
            "{}: not an 8-bit RGB PNG",
            path.display()
        )));
    }
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut text: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        if let Ok(v) = t.get_text() {
            text.push((t.keyword.clone(), v));
        }
    }
    Ok((
        RgbImage {
            width: info.width as usize,
            height: info.height as usize,
            data: buf,
        },
        text,
    ))
}
