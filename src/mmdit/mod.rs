//! The MMDiT transformer: shared pieces (embeddings, modulation, joint attention, joint blocks) and
//! the SD3 model built from them.

pub mod attention;
pub mod embed;
pub mod flux;
pub mod joint_block;
pub mod linear;
pub mod modulation;
pub mod rope;
pub mod sd3;
pub mod single_block;

pub use flux::FluxTransformer;
pub use sd3::Sd3Transformer;
