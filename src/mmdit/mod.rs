//! The MMDiT transformer: shared pieces (embeddings, modulation, joint attention, joint blocks) and
//! the SD3 model built from them.

pub mod attention;
pub mod embed;
pub mod joint_block;
pub mod modulation;
pub mod sd3;

pub use sd3::Sd3Transformer;
