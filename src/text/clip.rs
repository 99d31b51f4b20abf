//! CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`): causal
//! pre-LayerNorm transformer; we return the penultimate hidden state and the pooled (EOS) output.

use crate::config::ClipTextConfig;
use crate::nn::{linear, modulate, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

#[derive(Debug, Clone, Copy)]
enum Act {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Act {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::QuickGelu => crate::nn::activation::quick_gelu(x),
            Act::Gelu => crate::nn::activation::gelu_erf(x),
            Act::GeluTanh => x.gelu(),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Output of one CLIP pass.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// (b, 77, hidden): hidden state after the second-to-last layer (no final LayerNorm).
    pub penultimate: Tensor,
    /// (b, hidden): final-LayerNorm state at the EOS token.
    pub pooled: Tensor,
    /// (b, projection_dim): `pooled` through `text_projection`, when the model has one.
    pub projected: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct ClipText {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    cfg: ClipTextConfig,
    act: Act,
}

impl ClipText {
    /// `with_projection`: load `text_projection` (CLIPTextModelWithProjection).
    pub fn new(cfg: &ClipTextConfig, with_projection: bool, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(d, cfg.layer_norm_eps, vb);
        // transformers nests the text tower under `text_model.` (Hub checkpoints, and
        // CLIPTextModelWithProjection today); CLIPTextModel saved by transformers 5 has no prefix.
        let t = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = t.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, d),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = t.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: ln(l.pp("layer_norm1"))?,
                    q: linear(d, d, a.pp("q_proj"))?,
                    k: linear(d, d, a.pp("k_proj"))?,
                    v: linear(d, d, a.pp("v_proj"))?,
                    out: linear(d, d, a.pp("out_proj"))?,
                    ln2: ln(l.pp("layer_norm2"))?,
                    fc1: linear(d, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                    fc2: linear(cfg.intermediate_size, d, l.pp("mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_ln = ln(t.pp("final_layer_norm"))?;
        let projection = if with_projection {
            let p = cfg.projection_dim.unwrap_or(d);
            Some(Linear::new(candle_nn::linear_no_bias(
                d,
                p,
                vb.pp("text_projection"),
            )?)?)
        } else {
            None
        };
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Act::QuickGelu,
            "gelu_new" => Act::GeluTanh,
            _ => Act::Gelu,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            cfg: cfg.clone(),
            act,
        })
    }

    /// Longest token sequence (the position table's length, 77 for the released models).
    pub fn max_len(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// The pooled token per row, as transformers picks it: argmax of the ids when `eos_token_id == 2`
    /// (legacy configs, where EOS has the highest id), else the first occurrence of `eos_token_id`.
    fn eos_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // first index of the maximum, as torch.argmax
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&x| x == self.cfg.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect()
    }

    /// ids: b rows of equal length n (<= max_position_embeddings).
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<ClipOutput> {
        let b = ids.len();
        let n = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, n), device)?;
        let pos = self.position_embedding.narrow(0, 0, n)?;
        let mut x = self.token_embedding.forward(&ids_t)?.broadcast_add(&pos)?; // (b, n, d)
        let mask = causal_mask(n, device)?; // (1, 1, n, n) f32
        let heads = self.cfg.num_attention_heads;
        let mut penultimate = None;
        for (i, l) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = Some(x.clone());
            }
            let h = l.ln1.forward(&x)?;
            let q = crate::nn::split_heads(&l.q.forward(&h)?, heads)?;
            let k = crate::nn::split_heads(&l.k.forward(&h)?, heads)?;
            let v = crate::nn::split_heads(&l.v.forward(&h)?, heads)?;
            // In f32 and rounded once, as PyTorch's fused attention does for bf16 inputs: on the
            // CPU the fused attention with the causal mask as its bias; elsewhere composed in f32.
            let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
            let a = if x.device().is_cpu() {
                crate::nn::attention::sdpa_biased(&q, &k, &v, &mask, scale)?
            } else {
                let f32 = |t: Tensor| t.to_dtype(DType::F32)?.contiguous();
                let (q, k, v) = (f32(q)?, f32(k)?, f32(v)?);
                let scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?.broadcast_add(&mask)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                probs.matmul(&v)?.to_dtype(x.dtype())?
            };
            let a = crate::nn::merge_heads(&a)?;
            x = modulate::add(&x, &l.out.forward(&a)?)?;
            let h = l.ln2.forward(&x)?;
            x = modulate::add(&x, &l.fc2.forward(&self.act.forward(&l.fc1.forward(&h)?)?)?)?;
        }
        let penultimate = penultimate.unwrap_or_else(|| x.clone());
        let last = self.final_ln.forward(&x)?;
        let rows = self
            .eos_positions(ids)
            .into_iter()
            .enumerate()
            .map(|(i, p)| last.get(i)?.get(p))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?; // (b, d)
        let projected = match &self.projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            penultimate,
            pooled,
            projected,
        })
    }
}

/// (1, 1, n, n) additive f32 mask: 0 on and below the diagonal, -inf above.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (1, 1, n, n), device)
}
