//! The MMDiT transformers: the pieces every MMDiT family shares (embeddings, modulation, joint
//! attention, joint and single-stream blocks, RoPE) and the SD3, FLUX.1 and Chroma models built from them,
//! on the layers of [`crate::nn`].

pub mod attention;
pub mod chroma;
pub mod embed;
pub mod flux;
pub mod joint_block;
pub mod modulation;
pub mod rope;
pub mod sd3;
pub mod single_block;

pub use chroma::ChromaTransformer;
pub use flux::FluxTransformer;
pub use sd3::Sd3Transformer;
