//! SD3 prompt assembly, as diffusers' `StableDiffusion3Pipeline.encode_prompt` (diffusers 0.42.1):
//! CLIP-L and CLIP-G penultimate states side by side, padded (or cropped) to the T5 width, followed by
//! the T5 sequence (or zeros without T5); pooled = projected CLIP-L and CLIP-G outputs side by side.

use super::clip::ClipText;
use super::tokenize::TextTokenizer;
use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::t5::T5EncoderModel;

/// What the transformer is conditioned on.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (b, s, joint_attention_dim)
    pub context: Tensor,
    /// (b, pooled_projection_dim)
    pub pooled: Tensor,
}

/// A prompt that did not fit and lost its tail.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncation {
    pub encoder: &'static str,
    pub limit: usize,
    pub dropped: usize,
}

pub struct Sd3TextEncoders {
    pub clip_l: (ClipText, TextTokenizer),
    pub clip_g: (ClipText, TextTokenizer),
    pub t5: Option<(T5EncoderModel, TextTokenizer)>,
    /// Width of the zeros that stand in for T5 when it is absent.
    pub joint_attention_dim: usize,
    /// CLIP context length (77).
    pub clip_len: usize,
    pub device: Device,
    pub dtype: DType,
}

impl Sd3TextEncoders {
    /// Encodes one prompt. `max_seq` is the T5 length (`--max-sequence-length`).
    /// Returns the conditioning for a batch of one and any truncations.
    pub fn encode(
        &mut self,
        prompt: &str,
        max_seq: usize,
    ) -> Result<(Conditioning, Vec<Truncation>)> {
        let mut cut = Vec::new();
        let mut clip =
            |enc: &(ClipText, TextTokenizer), name: &'static str| -> Result<(Tensor, Tensor)> {
                let t = enc.1.encode_padded(prompt, self.clip_len)?;
                if t.dropped > 0 {
                    cut.push(Truncation {
                        encoder: name,
                        limit: self.clip_len,
                        dropped: t.dropped,
                    });
                }
                let out = enc.0.forward(&[t.ids], &self.device)?;
                let pooled = out.projected.unwrap_or(out.pooled);
                Ok((out.penultimate, pooled))
            };
        let (l_seq, l_pool) = clip(&self.clip_l, "CLIP-L")?;
        let (g_seq, g_pool) = clip(&self.clip_g, "CLIP-G")?;
        let clip_seq = Tensor::cat(&[l_seq, g_seq], D::Minus1)?; // (1, 77, dl + dg)
        let t5_seq = match &mut self.t5 {
            Some((model, tok)) => {
                let t = tok.encode_padded(prompt, max_seq)?;
                if t.dropped > 0 {
                    cut.push(Truncation {
                        encoder: "T5",
                        limit: max_seq,
                        dropped: t.dropped,
                    });
                }
                let ids = Tensor::new(t.ids.as_slice(), &self.device)?.unsqueeze(0)?;
                model.forward(&ids)?.to_dtype(self.dtype)? // (1, max_seq, d_t5)
            }
            None => Tensor::zeros(
                (1, max_seq, self.joint_attention_dim),
                self.dtype,
                &self.device,
            )?,
        };
        let width = t5_seq.dim(D::Minus1)?;
        let clip_w = clip_seq.dim(D::Minus1)?;
        let clip_seq = if clip_w < width {
            clip_seq.pad_with_zeros(D::Minus1, 0, width - clip_w)?
        } else {
            // torch's negative pad crops
            clip_seq.narrow(D::Minus1, 0, width)?
        };
        let context = Tensor::cat(&[clip_seq.to_dtype(self.dtype)?, t5_seq], 1)?;
        let pooled = Tensor::cat(&[l_pool, g_pool], D::Minus1)?.to_dtype(self.dtype)?;
        Ok((Conditioning { context, pooled }, cut))
    }
}

/// Flux prompt assembly, as diffusers' `FluxPipeline.encode_prompt`: CLIP-L pooled output (no
/// projection) and the T5 last hidden state.
pub struct FluxTextEncoders {
    pub clip: (ClipText, TextTokenizer),
    pub t5: (T5EncoderModel, TextTokenizer),
    pub clip_len: usize,
    pub device: Device,
    pub dtype: DType,
}

impl FluxTextEncoders {
    pub fn encode(
        &mut self,
        prompt: &str,
        max_seq: usize,
    ) -> Result<(Conditioning, Vec<Truncation>)> {
        let mut cut = Vec::new();
        let t = self.clip.1.encode_padded(prompt, self.clip_len)?;
        if t.dropped > 0 {
            cut.push(Truncation {
                encoder: "CLIP-L",
                limit: self.clip_len,
                dropped: t.dropped,
            });
        }
        let pooled = self
            .clip
            .0
            .forward(&[t.ids], &self.device)?
            .pooled
            .to_dtype(self.dtype)?;
        let t = self.t5.1.encode_padded(prompt, max_seq)?;
        if t.dropped > 0 {
            cut.push(Truncation {
                encoder: "T5",
                limit: max_seq,
                dropped: t.dropped,
            });
        }
        let ids = Tensor::new(t.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let context = self.t5.0.forward(&ids)?.to_dtype(self.dtype)?;
        Ok((Conditioning { context, pooled }, cut))
    }
}
