//! Prompt assembly for each family, as diffusers' pipelines do it (diffusers 0.42.1):
//! - SD3 (`StableDiffusion3Pipeline.encode_prompt`): CLIP-L and CLIP-G penultimate states side by
//!   side, padded (or cropped) to the T5 width, followed by the T5 sequence (or zeros without T5);
//!   pooled = projected CLIP-L and CLIP-G outputs side by side.
//! - Flux (`FluxPipeline.encode_prompt`): CLIP-L pooled output (no projection) and the T5 last
//!   hidden state.
//! - Chroma (`ChromaPipeline._get_t5_prompt_embeds`): T5 alone, run with the tokenizer's attention
//!   mask, and only the prompt's tokens and the first padding token kept: the transformer masks
//!   the rest (no pooled vector).
//! - FLUX.2 [klein] (`Flux2KleinPipeline._get_qwen3_prompt_embeds`): Qwen3's hidden states after
//!   layers 9, 18 and 27 of the chat-templated prompt, side by side (no pooled vector).

use super::clip::ClipText;
use super::lm::LmEncoder;
use super::t5::T5Encoder;
use super::tokenize::{ChatMessage, TextTokenizer};
use super::PromptEncoder;
use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};

/// What the transformer is conditioned on.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (b, s, joint_attention_dim)
    pub context: Tensor,
    /// (b, pooled_projection_dim); (b, 0) for a family without one (Chroma).
    pub pooled: Tensor,
}

/// A prompt that did not fit and lost its tail.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncation {
    pub encoder: &'static str,
    pub limit: usize,
    pub dropped: usize,
}

/// The ids of `prompt` padded or cut to `limit`; a cut is recorded in `cut` under `encoder`.
fn token_ids(
    tok: &TextTokenizer,
    prompt: &str,
    limit: usize,
    encoder: &'static str,
    cut: &mut Vec<Truncation>,
) -> Result<Vec<u32>> {
    let t = tok.encode_padded(prompt, limit)?;
    if t.dropped > 0 {
        cut.push(Truncation {
            encoder,
            limit,
            dropped: t.dropped,
        });
    }
    Ok(t.ids)
}

/// T5's last hidden states for token id rows of one length, (rows, len, d_model), in `dtype`.
fn t5_states(model: &T5Encoder, ids: &[Vec<u32>], device: &Device, dtype: DType) -> Result<Tensor> {
    let len = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, (ids.len(), len), device)?;
    Ok(model.forward(&ids)?.to_dtype(dtype)?)
}

/// Row i of each batched tensor, as the conditioning of prompt i (a batch of one).
fn per_prompt(context: &Tensor, pooled: &Tensor) -> Result<Vec<Conditioning>> {
    (0..context.dim(0)?)
        .map(|i| {
            Ok(Conditioning {
                context: context.narrow(0, i, 1)?,
                pooled: pooled.narrow(0, i, 1)?,
            })
        })
        .collect()
}

pub struct Sd3TextEncoders {
    pub clip_l: (ClipText, TextTokenizer),
    pub clip_g: (ClipText, TextTokenizer),
    pub t5: Option<(T5Encoder, TextTokenizer)>,
    /// Width of the zeros that stand in for T5 when it is absent.
    pub joint_attention_dim: usize,
    pub device: Device,
    pub dtype: DType,
}

impl PromptEncoder for Sd3TextEncoders {
    fn encode(&mut self, prompt: &str, max_seq: usize) -> Result<(Conditioning, Vec<Truncation>)> {
        super::only(self.encode_all(&[prompt], max_seq))
    }

    fn encode_all(
        &mut self,
        prompts: &[&str],
        max_seq: usize,
    ) -> Result<(Vec<Conditioning>, Vec<Truncation>)> {
        let mut cut = Vec::new();
        // Both CLIPs read the same length (77).
        let clip_len = self.clip_l.0.max_len().min(self.clip_g.0.max_len());
        let (mut l_ids, mut g_ids, mut t5_ids) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            l_ids.push(token_ids(&self.clip_l.1, p, clip_len, "CLIP-L", &mut cut)?);
            g_ids.push(token_ids(&self.clip_g.1, p, clip_len, "CLIP-G", &mut cut)?);
            if let Some((_, tok)) = &self.t5 {
                t5_ids.push(token_ids(tok, p, max_seq, "T5", &mut cut)?);
            }
        }
        let clip = |enc: &ClipText, ids: &[Vec<u32>]| -> Result<(Tensor, Tensor)> {
            let out = enc.forward(ids, &self.device)?;
            let pooled = out.projected.unwrap_or(out.pooled);
            Ok((out.penultimate, pooled))
        };
        let (l_seq, l_pool) = clip(&self.clip_l.0, &l_ids)?;
        let (g_seq, g_pool) = clip(&self.clip_g.0, &g_ids)?;
        let clip_seq = Tensor::cat(&[l_seq, g_seq], D::Minus1)?; // (b, 77, dl + dg)
        let t5_seq = match &self.t5 {
            Some((model, _)) => t5_states(model, &t5_ids, &self.device, self.dtype)?,
            None => Tensor::zeros(
                (prompts.len(), max_seq, self.joint_attention_dim),
                self.dtype,
                &self.device,
            )?,
        }; // (b, max_seq, d_t5)
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
        Ok((per_prompt(&context, &pooled)?, cut))
    }

    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)> {
        let mut v = vec![("CLIP-L", &self.clip_l.1), ("CLIP-G", &self.clip_g.1)];
        v.extend(self.t5.as_ref().map(|t| ("T5", &t.1)));
        v
    }
}

pub struct FluxTextEncoders {
    pub clip: (ClipText, TextTokenizer),
    pub t5: (T5Encoder, TextTokenizer),
    pub device: Device,
    pub dtype: DType,
}

impl PromptEncoder for FluxTextEncoders {
    fn encode(&mut self, prompt: &str, max_seq: usize) -> Result<(Conditioning, Vec<Truncation>)> {
        super::only(self.encode_all(&[prompt], max_seq))
    }

    fn encode_all(
        &mut self,
        prompts: &[&str],
        max_seq: usize,
    ) -> Result<(Vec<Conditioning>, Vec<Truncation>)> {
        let mut cut = Vec::new();
        let ((clip, clip_tok), (t5, t5_tok)) = (&self.clip, &self.t5);
        let (mut clip_ids, mut t5_ids) = (Vec::new(), Vec::new());
        for p in prompts {
            clip_ids.push(token_ids(clip_tok, p, clip.max_len(), "CLIP-L", &mut cut)?);
            t5_ids.push(token_ids(t5_tok, p, max_seq, "T5", &mut cut)?);
        }
        let pooled = clip
            .forward(&clip_ids, &self.device)?
            .pooled
            .to_dtype(self.dtype)?;
        let context = t5_states(t5, &t5_ids, &self.device, self.dtype)?;
        Ok((per_prompt(&context, &pooled)?, cut))
    }

    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)> {
        vec![("CLIP-L", &self.clip.1), ("T5", &self.t5.1)]
    }
}

pub struct ChromaTextEncoder {
    pub t5: (T5Encoder, TextTokenizer),
    pub device: Device,
    pub dtype: DType,
}

impl PromptEncoder for ChromaTextEncoder {
    /// The context is the first `len + 1` of `max_seq` tokens (the prompt's, then one padding
    /// token), `len + 1 <= max_seq`: the T5 states diffusers computes there, and exactly what its
    /// transformer attends to once it masks the rest. Prompts of a batch keep their own lengths:
    /// one after the other.
    fn encode(&mut self, prompt: &str, max_seq: usize) -> Result<(Conditioning, Vec<Truncation>)> {
        let mut cut = Vec::new();
        let (model, tok) = &self.t5;
        let t = tok.encode_padded(prompt, max_seq)?;
        if t.dropped > 0 {
            cut.push(Truncation {
                encoder: "T5",
                limit: max_seq,
                dropped: t.dropped,
            });
        }
        let keep = (t.len + 1).min(max_seq);
        let ids = Tensor::new(&t.ids[..keep], &self.device)?.unsqueeze(0)?;
        // The kept padding token attends to the prompt only, as under the full-length mask.
        let context = model.forward_masked(&ids, t.len)?.to_dtype(self.dtype)?;
        let pooled = Tensor::zeros((1, 0), self.dtype, &self.device)?;
        Ok((Conditioning { context, pooled }, cut))
    }

    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)> {
        vec![("T5", &self.t5.1)]
    }
}

/// FLUX.2 [dev]'s system message (BFL's, as diffusers' `SYSTEM_MESSAGE`).
pub const FLUX2_SYSTEM_MESSAGE: &str = "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object\nattribution and actions without speculation.";

/// FLUX.2's text encoder: a language model's hidden states of the chat-templated prompt.
pub struct Flux2TextEncoder {
    pub lm: (LmEncoder, TextTokenizer),
    /// [dev] (Mistral 3): the prompt follows this system message; [klein] (Qwen3): none.
    pub system: Option<&'static str>,
    pub device: Device,
    pub dtype: DType,
}

impl Flux2TextEncoder {
    fn name(&self) -> &'static str {
        self.lm.0.kind().label()
    }
}

impl PromptEncoder for Flux2TextEncoder {
    /// FLUX.2 [klein] (`Flux2KleinPipeline._get_qwen3_prompt_embeds`): the prompt as a user
    /// message through the chat template, with the assistant's turn opened, tokenized with the
    /// tokenizer's special tokens and right-padded. FLUX.2 [dev]
    /// (`Flux2Pipeline._get_mistral_3_small_prompt_embeds`): the system message and the prompt
    /// (without `[IMG]`) as text blocks through the chat template, tokenized as it is (no special
    /// tokens added) and padded on the tokenizer's side. Either way padded or cut to `max_seq`
    /// tokens, and the hidden states taken side by side per token (all `max_seq` tokens, padding
    /// included: the transformer attends to every one). Prompts of a batch one after the other.
    fn encode(&mut self, prompt: &str, max_seq: usize) -> Result<(Conditioning, Vec<Truncation>)> {
        let mut cut = Vec::new();
        let name = self.name();
        let (model, tok) = &self.lm;
        let (t, valid) = match self.system {
            None => {
                let t = tok.encode_padded(&tok.apply_chat_template(prompt)?, max_seq)?;
                let valid = (0..max_seq).map(|i| i < t.len).collect::<Vec<_>>();
                (t, valid)
            }
            Some(system) => {
                let prompt = prompt.replace("[IMG]", "");
                let msg = |role, text| ChatMessage {
                    role,
                    text,
                    blocks: true,
                };
                let text =
                    tok.render_chat(&[msg("system", system), msg("user", &prompt)], false)?;
                tok.encode_chat(&text, max_seq)?
            }
        };
        if t.dropped > 0 {
            cut.push(Truncation {
                encoder: name,
                limit: max_seq,
                dropped: t.dropped,
            });
        }
        let ids = Tensor::new(t.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let context = model.forward(&ids, &valid)?.to_dtype(self.dtype)?;
        let pooled = Tensor::zeros((1, 0), self.dtype, &self.device)?;
        Ok((Conditioning { context, pooled }, cut))
    }

    fn tokenizers(&self) -> Vec<(&'static str, &TextTokenizer)> {
        vec![(self.name(), &self.lm.1)]
    }
}
