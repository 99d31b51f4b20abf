//! The T5 encoder (transformers' `T5EncoderModel`: T5 v1.1 as SD3 and FLUX.1 use it) on our layers:
//! its projections are [`crate::nn::linear`]s, so they run on the packed CPU kernels, and on
//! GGML blocks when a GGUF file stores them ([`crate::nn::quant::with_stored`]). The arithmetic is
//! candle-transformers' `t5` module's (which matches transformers): RMS layer norm in f32, no
//! scaling of the attention scores, the relative position bias of the first layer shared by all.

use crate::nn::{self, Linear, RmsNorm};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use candle_transformers::models::t5::Config;
use rayon::prelude::*;

/// The feed-forward layer: gated (v1.1: act(wi_0 x) * wi_1 x) or plain (act(wi x)), then wo.
#[derive(Debug, Clone)]
struct FeedForward {
    norm: RmsNorm,
    wi: Linear,
    gate: Option<Linear>,
    wo: Linear,
    act: candle_nn::Activation,
}

impl FeedForward {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let norm = RmsNorm::new(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer_norm"))?;
        let d = vb.pp("DenseReluDense");
        let (wi, gate) = if cfg.feed_forward_proj.gated {
            (
                nn::linear_no_bias(cfg.d_model, cfg.d_ff, d.pp("wi_1"))?,
                Some(nn::linear_no_bias(cfg.d_model, cfg.d_ff, d.pp("wi_0"))?),
            )
        } else {
            (nn::linear_no_bias(cfg.d_model, cfg.d_ff, d.pp("wi"))?, None)
        };
        let act = match cfg.feed_forward_proj.gated {
            true => cfg.feed_forward_proj.activation,
            false => candle_nn::Activation::Relu,
        };
        Ok(Self {
            norm,
            wi,
            gate,
            wo: nn::linear_no_bias(cfg.d_ff, cfg.d_model, d.pp("wo"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(xs)?;
        let y = match &self.gate {
            // In f32 the roundings are f32's: the vectorised tanh-GELU is within them, folded into
            // the gate's product where its kernel can (`Linear::forward_gelu`: the same values).
            Some(g) if self.act == candle_nn::Activation::NewGelu && h.dtype() == DType::F32 => {
                g.forward_gelu(&h)?.mul(&self.wi.forward(&h)?)?
            }
            Some(g) => {
                let (gate, up) = (g.forward(&h)?, self.wi.forward(&h)?);
                match self.act {
                    // candle's bf16 op, vectorised, and the product with it.
                    candle_nn::Activation::NewGelu
                        if gate.device().is_cpu() && gate.dtype() == DType::BF16 =>
                    {
                        crate::cpu::elementwise::gelu_new_mul_bf16(&gate, &up)?
                    }
                    _ => self.act(&gate)?.mul(&up)?,
                }
            }
            None => self.act(&self.wi.forward(&h)?)?,
        };
        nn::modulate::add(xs, &self.wo.forward(&y)?)
    }

    /// The activation. `gelu_pytorch_tanh` (PyTorch's fused op, one rounding) on
    /// [`nn::gelu_tanh`]'s vectorised kernels; `gelu_new` (T5 v1.1's) keeps candle's op, whose
    /// roundings in bf16 follow transformers' composed one (with a fused kernel rounding once the
    /// demo's bf16 image of the green square fell from 27.4 to 24.5 dB against diffusers' f32); in
    /// the gated bf16 layer on the CPU the same roundings run vectorised
    /// ([`crate::cpu::elementwise::gelu_new_mul_bf16`]), and in f32 it is [`nn::gelu_tanh`].
    fn act(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            candle_nn::Activation::GeluPytorchTanh => nn::gelu_tanh(x),
            act => act.forward(x),
        }
    }
}

/// Self-attention with its layer norm; the first layer's holds the relative position bias.
#[derive(Debug, Clone)]
struct SelfAttention {
    norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    bias: Option<Embedding>,
    buckets: usize,
    max_distance: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, with_bias: bool, vb: VarBuilder) -> Result<Self> {
        let norm = RmsNorm::new(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer_norm"))?;
        let a = vb.pp("SelfAttention");
        let inner = cfg.num_heads * cfg.d_kv;
        let bias = match with_bias {
            true => {
                let w = a.get(
                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                    "relative_attention_bias.weight",
                )?;
                Some(Embedding::new(w, cfg.num_heads))
            }
            false => None,
        };
        Ok(Self {
            norm,
            q: nn::linear_no_bias(cfg.d_model, inner, a.pp("q"))?,
            k: nn::linear_no_bias(cfg.d_model, inner, a.pp("k"))?,
            v: nn::linear_no_bias(cfg.d_model, inner, a.pp("v"))?,
            o: nn::linear_no_bias(inner, cfg.d_model, a.pp("o"))?,
            heads: cfg.num_heads,
            bias,
            buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// The bidirectional relative-position bucket of key `j` for query `i` (transformers'
    /// `_relative_position_bucket`, as candle-transformers computes it).
    fn bucket(&self, i: u32, j: u32) -> u32 {
        let half = self.buckets as u32 / 2;
        let exact = half / 2;
        // (Saturating: a config of one bucket must give bucket 0, not a panic.)
        let last = (self.buckets as u32).saturating_sub(1);
        let far = |d: u32| {
            let b = f32::log(
                d as f32 / exact as f32,
                self.max_distance as f32 / exact as f32,
            ) * (half - exact) as f32;
            exact.saturating_add(b as u32)
        };
        if i < j {
            match j - i < exact {
                true => j - i + half,
                false => u32::min(far(j - i).saturating_add(half), last),
            }
        } else {
            match i - j < exact {
                true => i - j,
                false => u32::min(far(i - j), half.saturating_sub(1)),
            }
        }
    }

    /// The (1, heads, n, n) f32 bias, head by head from the (buckets, heads) table, with
    /// transformers' key mask folded in: `dtype`'s lowest value added to the columns of keys at
    /// `valid` and after (their softmax weights become exactly 0). The bucket depends on j - i
    /// only, so row i of a head is a window of one line of 2n - 1 values. Every value is the one
    /// transformers' `dtype` arithmetic gives (a table value, or the lowest value, which absorbs
    /// any table value in f32 as in `dtype`).
    fn position_bias(
        &self,
        emb: &Embedding,
        n: usize,
        valid: usize,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let table = emb.embeddings().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let heads = table.first().map_or(0, Vec::len);
        // Line t holds the bucket of keys t - (n - 1) positions after the query.
        let line: Vec<usize> = (0..(2 * n).saturating_sub(1))
            .map(|t| match t.checked_sub(n - 1) {
                Some(after) => self.bucket(0, after as u32) as usize,
                None => self.bucket((n - 1 - t) as u32, 0) as usize,
            })
            .collect();
        if line.iter().any(|&b| b >= table.len()) {
            candle_core::bail!(
                "T5: the relative attention bias has {} buckets, the config asks for {}",
                table.len(),
                self.buckets
            );
        }
        let low = match dtype {
            DType::BF16 => half::bf16::MIN.to_f32(),
            DType::F16 => half::f16::MIN.to_f32(),
            _ => f32::MIN,
        };
        // Each head's line of values, and each row of the head its window, then the mask.
        let lines: Vec<f32> = (0..heads)
            .flat_map(|h| line.iter().map(move |&id| (id, h)))
            .map(|(id, h)| table[id][h])
            .collect();
        let mut bias = vec![0f32; heads * n * n];
        bias.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(hi, row)| {
                let (h, i) = (hi / n, hi % n);
                row.copy_from_slice(&lines[h * (2 * n - 1) + n - 1 - i..][..n]);
                for b in row.iter_mut().skip(valid) {
                    *b += low;
                }
            });
        Tensor::from_vec(bias, (1, heads, n, n), dev)
    }

    /// The layer's output and the position bias (computed here by the first layer, with the key
    /// mask of the first `valid` tokens folded in, and passed on).
    fn forward(&self, xs: &Tensor, bias: Option<Tensor>, valid: usize) -> Result<(Tensor, Tensor)> {
        let n = xs.dim(1)?;
        let h = self.norm.forward(xs)?;
        let split = |t: Tensor| nn::split_heads(&t, self.heads);
        let bias = match (bias, &self.bias) {
            (Some(p), _) => p,
            (None, Some(emb)) => self.position_bias(emb, n, valid, xs.dtype(), xs.device())?,
            (None, None) => {
                candle_core::bail!("T5: the first layer has no relative attention bias")
            }
        };
        // softmax(q kᵀ + bias) v, unscaled as T5's is, on the fused attention: as transformers'
        // T5 takes it through PyTorch's SDPA (its default), the bias added to the f32 scores and
        // the softmax in f32, the output rounded to the model's dtype once.
        let (q, k, v) = (
            split(self.q.forward(&h)?)?,
            split(self.k.forward(&h)?)?,
            split(self.v.forward(&h)?)?,
        );
        let y = nn::attention::sdpa_biased(&q, &k, &v, &bias, 1.0)?;
        let y = nn::merge_heads(&y)?;
        Ok((nn::modulate::add(xs, &self.o.forward(&y)?)?, bias))
    }
}

/// transformers' `T5EncoderModel`: the token embedding, the layers and the final norm.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embed: Embedding,
    layers: Vec<(SelfAttention, FeedForward)>,
    norm: RmsNorm,
}

impl T5Encoder {
    /// Built from `vb` in transformers' names (`shared.weight`, `encoder.block.<i>.layer.<0|1>...`,
    /// `encoder.final_layer_norm.weight`).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let table = match vb.contains_tensor("shared.weight") {
            true => vb.pp("shared"),
            false => vb.pp("encoder.embed_tokens"),
        };
        let embed = Embedding::new(
            table.get((cfg.vocab_size, cfg.d_model), "weight")?,
            cfg.d_model,
        );
        let e = vb.pp("encoder");
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = e.pp(format!("block.{i}.layer"));
                Ok((
                    SelfAttention::new(cfg, i == 0, l.pp("0"))?,
                    FeedForward::new(cfg, l.pp("1"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            layers,
            norm: RmsNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                e.pp("final_layer_norm"),
            )?,
        })
    }

    /// The last hidden state, (batch, len, d_model), for token ids (batch, len).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_masked(ids, ids.dim(1)?)
    }

    /// [`Self::forward`] with transformers' attention mask of ones on the first `valid` tokens:
    /// no token attends to those after them.
    pub fn forward_masked(&self, ids: &Tensor, valid: usize) -> Result<Tensor> {
        let mut x = self.embed.forward(ids)?;
        let mut bias = None;
        for (attn, ff) in &self.layers {
            let (y, b) = attn.forward(&x, bias, valid)?;
            bias = Some(b);
            x = ff.forward(&y)?;
        }
        self.norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention(buckets: usize, max_distance: usize) -> SelfAttention {
        let l = || {
            Linear::new(candle_nn::Linear::new(
                Tensor::zeros((1, 1), DType::F32, &candle_core::Device::Cpu).unwrap(),
                None,
            ))
            .unwrap()
        };
        SelfAttention {
            norm: RmsNorm::from_weight(
                Tensor::ones(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
                1e-6,
            ),
            q: l(),
            k: l(),
            v: l(),
            o: l(),
            heads: 1,
            bias: None,
            buckets,
            max_distance,
        }
    }

    /// transformers' buckets for T5's 32 buckets and distance 128 (bidirectional), and every
    /// bucket of a degenerate config within range.
    #[test]
    fn relative_position_buckets() {
        let a = attention(32, 128);
        // From transformers' T5Attention._relative_position_bucket; keys after the query use
        // the upper half.
        let want = [
            (0, 0, 0),
            (5, 0, 5),
            (0, 5, 21),
            (20, 0, 10),
            (0, 20, 26),
            (500, 0, 15),
            (0, 500, 31),
        ];
        for (i, j, b) in want {
            assert_eq!(a.bucket(i, j), b, "({i}, {j})");
        }
        for (n, d) in [(1, 128), (2, 0), (3, 1)] {
            let a = attention(n, d);
            for (i, j) in [(0, 0), (0, 9), (9, 0), (0, 1000), (1000, 0)] {
                assert!(
                    (a.bucket(i, j) as usize) < n.max(1),
                    "{n} buckets: ({i}, {j})"
                );
            }
        }
    }
}
