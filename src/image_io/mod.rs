//! Images in: PNG, JPEG and WebP files read with the `image` crate under decoding limits, turned
//! into the 8-bit RGB the pipelines take, and resized as diffusers' image processor does.

mod read;
mod resize;

pub use read::{read_rgb, MAX_DECODED_BYTES, MAX_SIDE};
pub use resize::lanczos_resize;
