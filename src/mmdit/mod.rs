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
pub use flux::FluxTransformer;
pub use flux2::Flux2Transformer;
pub use sd3::Sd3Transformer;
