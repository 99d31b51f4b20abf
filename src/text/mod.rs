//! Text side: tokenizers, CLIP and T5 encoders, and the assembly of the conditioning each model
//! family expects from them ([`PromptEncoder`]).

pub mod clip;
pub mod conditioning;
pub mod lm;
pub mod t5;
pub mod tokenize;

pub use conditioning::{
    ChromaTextEncoder, Conditioning, Flux2TextEncoder, FluxTextEncoders, Sd3TextEncoders,
    Truncation, FLUX2_SYSTEM_MESSAGE,
};
pub use tokenize::TextTokenizer;

/// A family's text encoders and tokenizers, as its pipeline uses them.
pub trait PromptEncoder: Send {
    /// Encodes one prompt for a batch of one, with T5 (where the family has it) padded or cut to
    /// `max_seq` tokens; also returns each encoder that had to cut the prompt.
    fn encode(
        &mut self,
        prompt: &str,
        max_seq: usize,
    ) -> crate::Result<(Conditioning, Vec<Truncation>)>;

    /// The tokenizers, each with the name of its encoder (`CLIP-L`, `CLIP-G`, `T5`), in order.
    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)>;
}
