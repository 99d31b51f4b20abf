//! The MMDiT transformers: the pieces every MMDiT family shares (embeddings, modulation, joint
//! attention, joint and single-stream blocks, RoPE) and the SD3, FLUX.1, Chroma and FLUX.2 models built from them,
//! on the layers of [`crate::nn`].

pub mod attention;
pub mod cache;
pub mod chroma;
pub mod embed;
pub mod flux;
pub mod flux2;
pub mod joint_block;
pub mod modulation;
pub mod rope;
pub mod sd3;
pub mod single_block;

pub use chroma::ChromaTransformer;

use candle_core::{Module, Result, Tensor};

/// The text stream as a transformer is given it: the text encoders' states, or those states already
/// through the model's context embedder (its `embed_context`), as a sampler keeps them for every
/// step of a request.
#[derive(Debug, Clone, Copy)]
pub enum Text<'a> {
    /// (b, s, joint_attention_dim)
    Encoded(&'a Tensor),
    /// (b, s, dim)
    Embedded(&'a Tensor),
}

impl Text<'_> {
    /// The embedded states: `embedder` applied to encoded ones.
    fn embedded(self, embedder: &impl Module) -> Result<Tensor> {
        match self {
            Text::Encoded(c) => embedder.forward(c),
            Text::Embedded(e) => Ok(e.clone()),
        }
    }
}
pub use flux::FluxTransformer;
pub use flux2::Flux2Transformer;
pub use sd3::Sd3Transformer;
