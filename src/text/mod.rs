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

    /// [`Self::encode`] of each prompt, the cuts prompt by prompt: one after the other, or, for
    /// families whose prompts all come to the same length (SD3, FLUX.1: CLIP's 77 tokens and T5
    /// padded to `max_seq`), through each encoder as one batch -- a generation's prompt and
    /// negative prompt in one pass, each weight read once for both -- with the values of
    /// encoding each alone.
    fn encode_all(
        &mut self,
        prompts: &[&str],
        max_seq: usize,
    ) -> crate::Result<(Vec<Conditioning>, Vec<Truncation>)> {
        let (mut out, mut cut) = (Vec::new(), Vec::new());
        for p in prompts {
            let (c, more) = self.encode(p, max_seq)?;
            out.push(c);
            cut.extend(more);
        }
        Ok((out, cut))
    }

    /// The tokenizers, each with the name of its encoder (`CLIP-L`, `CLIP-G`, `T5`), in order.
    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)>;
}

/// The conditioning of a batch of one prompt, from [`PromptEncoder::encode_all`] (for families
/// that implement [`PromptEncoder::encode`] through it).
fn only(
    encoded: crate::Result<(Vec<Conditioning>, Vec<Truncation>)>,
) -> crate::Result<(Conditioning, Vec<Truncation>)> {
    let (c, cut) = encoded?;
    match <[Conditioning; 1]>::try_from(c) {
        Ok([c]) => Ok((c, cut)),
        Err(c) => Err(candle_core::Error::Msg(format!(
            "the text encoders gave {} conditionings for one prompt",
            c.len()
        ))
        .into()),
    }
}
