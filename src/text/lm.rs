//! Decoder-only language models as text encoders: Qwen3 (FLUX.2 [klein], transformers'
//! `Qwen3ForCausalLM`) and Mistral (FLUX.2 [dev], the language model of
//! `Mistral3ForConditionalGeneration`). Their decoder layers (GQA attention with RoPE, per-head q/k
//! RMSNorm in Qwen3's, SwiGLU MLP) run causally over a padded prompt, returning the hidden states
//! after chosen layers (diffusers takes 9, 18, 27 of Qwen3 and 10, 20, 30 of Mistral), side by side.
//! Only the layers up to the last one taken are loaded.

use crate::config::Qwen3Config;
use crate::nn::{activation, attention, linear_with, modulate, Linear, RmsNorm};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

/// Which language model: where its decoder's weights sit and whether its heads have q/k norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmKind {
    /// `model.*`, q/k norms.
    Qwen3,
    /// `language_model.model.*` (as transformers saves `Mistral3ForConditionalGeneration`) or
    /// `model.language_model.*`; no q/k norms.
    Mistral3,
}

impl LmKind {
    /// The model's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            LmKind::Qwen3 => "Qwen3",
            LmKind::Mistral3 => "Mistral 3",
        }
    }
    /// Where the decoder's weights may sit, in the order they are looked for.
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            LmKind::Qwen3 => &["model"],
            LmKind::Mistral3 => &["language_model.model", "model.language_model"],
        }
    }

    /// The language-model heads and other parts of the checkpoint an encoder never reads.
    fn unread_parts(self) -> &'static [&'static str] {
        match self {
            LmKind::Qwen3 => &["lm_head."],
            LmKind::Mistral3 => &[
                "lm_head.",
                "language_model.lm_head.",
                "vision_tower.",
                "model.vision_tower.",
                "multi_modal_projector.",
                "model.multi_modal_projector.",
            ],
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3's per-head norms.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    fn new(cfg: &Qwen3Config, qk_norm: bool, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let b = cfg.attention_bias;
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(Self {
            input_norm: RmsNorm::new(d, eps, vb.pp("input_layernorm"))?,
            q: linear_with(d, h * hd, b, a.pp("q_proj"))?,
            k: linear_with(d, kv * hd, b, a.pp("k_proj"))?,
            v: linear_with(d, kv * hd, b, a.pp("v_proj"))?,
            o: linear_with(h * hd, d, false, a.pp("o_proj"))?,
            qk_norm: match qk_norm {
                true => Some((
                    RmsNorm::new(hd, eps, a.pp("q_norm"))?,
                    RmsNorm::new(hd, eps, a.pp("k_norm"))?,
                )),
                false => None,
            },
            post_norm: RmsNorm::new(d, eps, vb.pp("post_attention_layernorm"))?,
            gate: linear_with(d, cfg.intermediate_size, false, m.pp("gate_proj"))?,
            up: linear_with(d, cfg.intermediate_size, false, m.pp("up_proj"))?,
            down: linear_with(cfg.intermediate_size, d, false, m.pp("down_proj"))?,
        })
    }
}

/// The decoder up to the last layer whose output is taken.
#[derive(Debug, Clone)]
pub struct LmEncoder {
    embed: Embedding,
    layers: Vec<Layer>,
    /// The final norm, applied when the output of the last layer of the model is taken.
    norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f64,
    /// After how many layers the hidden states are taken.
    taken: Vec<usize>,
    kind: LmKind,
}

impl LmEncoder {
    /// `taken`: the indices into transformers' `hidden_states` (0 = the embeddings, k = after k
    /// layers, `num_hidden_layers` = after the final norm), each at most `num_hidden_layers`.
    pub fn new(cfg: &Qwen3Config, kind: LmKind, taken: &[usize], vb: VarBuilder) -> Result<Self> {
        let n = cfg.num_hidden_layers;
        let last = taken.iter().copied().max().unwrap_or(0);
        if last > n {
            candle_core::bail!(
                "the text encoder has {n} layers; hidden state {last} was asked for"
            );
        }
        let prefixes = kind.prefixes();
        let prefix = prefixes
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}.embed_tokens.weight")))
            .unwrap_or(&prefixes[0]);
        let m = vb.pp(*prefix);
        let embed = Embedding::new(
            m.pp("embed_tokens")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")?,
            cfg.hidden_size,
        );
        let layers = (0..last.min(n))
            .map(|i| Layer::new(cfg, kind == LmKind::Qwen3, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = (last == n)
            .then(|| RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm")))
            .transpose()?;
        Ok(Self {
            embed,
            layers,
            norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            theta: cfg.rope_theta(),
            taken: taken.to_vec(),
            kind,
        })
    }

    /// Which language model this is.
    pub fn kind(&self) -> LmKind {
        self.kind
    }

    /// The names of the checkpoint's tensors this encoder does not read: the layers after the
    /// last one taken, the final norm unless taken, the language-model head (and Mistral 3's
    /// vision tower and projector).
    pub fn unread(cfg: &Qwen3Config, kind: LmKind, taken: &[usize], name: &str) -> bool {
        let last = taken.iter().copied().max().unwrap_or(0);
        if kind.unread_parts().iter().any(|p| name.starts_with(p)) {
            return true;
        }
        let Some(rest) = kind
            .prefixes()
            .iter()
            .find_map(|p| name.strip_prefix(p)?.strip_prefix('.'))
        else {
            return false;
        };
        if rest.starts_with("norm.") {
            return last < cfg.num_hidden_layers;
        }
        let layer = rest
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        layer.is_some_and(|i| i >= last)
    }

    /// RoPE tables (L, head_dim / 2) as transformers computes them in f32: `inv_freq = 1 /
    /// theta^(2i/d)`, angles `pos * inv_freq` (transformers repeats them for the second half of the
    /// head; [`rotate`] reads each for both).
    fn rope(&self, len: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let d = self.head_dim;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let mut cos = Vec::with_capacity(len * d / 2);
        let mut sin = Vec::with_capacity(len * d / 2);
        for p in 0..len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, d / 2), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, d / 2), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// ids: (1, L), `valid[i]` whether token i is the prompt's (false: padding, on either side)
    /// -> (1, L, taken x hidden): the hidden states after each taken layer, side by side, in
    /// `taken`'s order. Positions count from 0 at the first token, padding included, as
    /// transformers counts them when given no position ids.
    pub fn forward(&self, ids: &Tensor, valid: &[bool]) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if valid.len() != l {
            candle_core::bail!("{} validity flags for {l} tokens", valid.len());
        }
        let dev = ids.device();
        let mut x = self.embed.forward(ids)?;
        let dtype = x.dtype();
        let (cos, sin) = self.rope(l, dtype, dev)?;
        // Causal, and no token attends to padding (transformers' mask from the attention mask),
        // in f32 as the attention's bias ([`attention::sdpa_biased`]). A row with no key left
        // (left padding's first tokens) attends to nothing: torch's SDPA gives it zeros, so its
        // mask row hides nothing and its output is zeroed after (`rows`, where there are such).
        let allowed = |i: usize, j: usize| j <= i && valid[j];
        let rows: Vec<f32> = (0..l)
            .map(|i| f32::from(u8::from((0..=i).any(|j| allowed(i, j)))))
            .collect();
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| {
                let empty = rows[i] == 0.0;
                (0..l).map(move |j| match allowed(i, j) || empty {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, l, l), dev)?;
        let rows = match rows.contains(&0.0) {
            true => Some(Tensor::from_vec(rows, (1, 1, l, 1), dev)?.to_dtype(dtype)?),
            false => None,
        };
        let mask = (mask, rows);
        let mut states = vec![None; self.layers.len() + 1];
        let keep = |k: usize| self.taken.contains(&k);
        if keep(0) {
            states[0] = Some(x.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer(layer, &x, &cos, &sin, &mask, b, l)?;
            if keep(i + 1) {
                states[i + 1] = Some(x.clone());
            }
        }
        if let Some(norm) = &self.norm {
            let n = self.layers.len();
            states[n] = Some(norm.forward(&x)?);
        }
        let taken = self
            .taken
            .iter()
            .map(|&k| {
                states[k].clone().ok_or_else(|| {
                    candle_core::Error::Msg(format!("hidden state {k} was not kept"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&taken, D::Minus1)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        w: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (mask, rows): &(Tensor, Option<Tensor>),
        b: usize,
        l: usize,
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        let h = w.input_norm.forward(x)?;
        let heads = |t: Tensor, n: usize| t.reshape((b, l, n, hd));
        let (mut q, mut k) = (
            heads(w.q.forward(&h)?, self.heads)?,
            heads(w.k.forward(&h)?, self.kv_heads)?,
        );
        if let Some((q_norm, k_norm)) = &w.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let (q, k) = (q.transpose(1, 2)?, k.transpose(1, 2)?);
        let v = heads(w.v.forward(&h)?, self.kv_heads)?.transpose(1, 2)?;
        let q = rotate(&q, cos, sin)?;
        let k = rotate(&k, cos, sin)?;
        let rep = self.heads / self.kv_heads;
        let expand = |t: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return t.contiguous();
            }
            t.unsqueeze(2)?
                .broadcast_as((b, self.kv_heads, rep, l, hd))?
                .reshape((b, self.heads, l, hd))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let o = attention::sdpa_biased(&q.contiguous()?, &k, &v, mask, 1.0 / (hd as f64).sqrt())?;
        let o = match rows {
            Some(rows) => o.broadcast_mul(rows)?,
            None => o,
        };
        let o = o.transpose(1, 2)?.reshape((b, l, self.heads * hd))?;
        let x = modulate::add(x, &w.o.forward(&o)?)?;
        let h = w.post_norm.forward(&x)?;
        let gated = activation::silu_mul(&w.gate.forward(&h)?, &w.up.forward(&h)?)?;
        modulate::add(&x, &w.down.forward(&gated)?)
    }
}

/// transformers' `apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin`, `rotate_half(x) =
/// [-x2, x1]` over the two halves of the head, on candle's fused kernel (each product and the sum
/// rounded to x's dtype, as the composed ops round them). x: (b, h, L, d); cos, sin: (L, d / 2).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}
