//! Text side: tokenizers, CLIP and T5 encoders, and the assembly of the conditioning each model expects.

pub mod clip;
pub mod conditioning;
pub mod tokenize;

pub use conditioning::{Conditioning, FluxTextEncoders, Sd3TextEncoders};
pub use tokenize::TextTokenizer;
