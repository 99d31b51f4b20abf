//! Multi-head attention with optional per-head q/k RMSNorm, and the joint attention of MMDiT where
//! the image and text streams attend together over their concatenated tokens.

use super::rope::Rope;
use candle_core::{DType, Module, Result, Tensor, D};

/// Where the text tokens go in the joint sequence: after the image (SD3) or before it (Flux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrder {
    ImageFirst,
    TextFirst,
}
use candle_nn::{Linear, VarBuilder};

/// diffusers' `RMSNorm` over the head dim: `x / sqrt(mean(x^2) + eps) * weight`, statistics in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    /// x: (..., dim)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

/// Scaled dot-product attention. Queries are processed in blocks so the score matrix never exceeds
/// a fixed budget; softmax runs in f32.
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d) -> (b, h, n, d)
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.transpose(2, 3)?.contiguous()?; // (b, h, d, m)
                                               // At most ~64 MiB of f32 scores per block.
    let block = ((16usize << 20) / (b * h * m).max(1)).clamp(1, n);
    let mut outs = Vec::with_capacity(n.div_ceil(block));
    let mut start = 0;
    while start < n {
        let len = block.min(n - start);
        let qb = q.narrow(2, start, len)?;
        let scores = (qb.matmul(&kt)? * scale)?.to_dtype(DType::F32)?; // (b, h, len, m)
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(v)?); // (b, h, len, d)
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// (b, n, h*d) -> (b, h, n, d)
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = x.dims3()?;
    x.reshape((b, n, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// (b, h, n, d) -> (b, n, h*d)
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

/// q, k, v projections of one stream with optional per-head RMSNorm on q and k.
#[derive(Debug, Clone)]
pub struct QkvProj {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    heads: usize,
}

impl QkvProj {
    /// `names` = (q, k, v, norm_q, norm_k) weight names under `vb`.
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let norm = |n: &str| -> Result<Option<RmsNorm>> {
            if qk_norm {
                Ok(Some(RmsNorm::new(head_dim, 1e-6, vb.pp(n))?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: candle_nn::linear(dim, inner, vb.pp(names[0]))?,
            k: candle_nn::linear(dim, inner, vb.pp(names[1]))?,
            v: candle_nn::linear(dim, inner, vb.pp(names[2]))?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            heads,
        })
    }

    /// x: (b, n, dim) -> q, k, v each (b, h, n, d)
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mut q = split_heads(&self.q.forward(x)?, self.heads)?;
        let mut k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        if let Some(n) = &self.norm_q {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.norm_k {
            k = n.forward(&k)?;
        }
        Ok((q, k, v))
    }
}

/// diffusers `Attention` as MMDiT uses it: an image stream (`to_q/k/v`, `to_out.0`) and, for joint
/// attention, a context stream (`add_q/k/v_proj`, `to_add_out` unless the block is context-pre-only).
#[derive(Debug, Clone)]
pub struct JointAttention {
    img: QkvProj,
    to_out: Linear,
    ctx: Option<(QkvProj, Option<Linear>)>,
}

impl JointAttention {
    /// `joint`: has a context stream; `ctx_out`: the context stream has an output projection.
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        joint: bool,
        ctx_out: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let img = QkvProj::new(
            dim,
            heads,
            head_dim,
            qk_norm,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            &vb,
        )?;
        let to_out = candle_nn::linear(inner, dim, vb.pp("to_out.0"))?;
        let ctx = if joint {
            let names = [
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "norm_added_q",
                "norm_added_k",
            ];
            let proj = QkvProj::new(dim, heads, head_dim, qk_norm, names, &vb)?;
            let out = if ctx_out {
                Some(candle_nn::linear(inner, dim, vb.pp("to_add_out"))?)
            } else {
                None
            };
            Some((proj, out))
        } else {
            None
        };
        Ok(Self { img, to_out, ctx })
    }

    /// Self-attention over the image stream alone. x: (b, n, dim) -> (b, n, dim)
    pub fn forward_self(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.img.forward(x)?;
        self.to_out.forward(&merge_heads(&sdpa(&q, &k, &v)?)?)
    }

    /// Joint attention over the image and text tokens, concatenated in `order`, with optional RoPE
    /// over the joint sequence (Flux; the rotation tables then follow the same order).
    ///
    /// # Shapes
    /// x: (b, n, dim), ctx: (b, s, dim) -> (b, n, dim) and, unless context-pre-only, (b, s, dim)
    pub fn forward_joint(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        order: TokenOrder,
        rope: Option<&Rope>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (ctx_proj, ctx_out) = self
            .ctx
            .as_ref()
            .expect("joint attention built with a context stream");
        let n = x.dim(1)?;
        let s = ctx.dim(1)?;
        let (q, k, v) = self.img.forward(x)?;
        let (cq, ck, cv) = ctx_proj.forward(ctx)?;
        let join = |a: Tensor, c: Tensor| match order {
            TokenOrder::ImageFirst => Tensor::cat(&[a, c], 2),
            TokenOrder::TextFirst => Tensor::cat(&[c, a], 2),
        };
        let (mut q, mut k, v) = (join(q, cq)?, join(k, ck)?, join(v, cv)?);
        if let Some(r) = rope {
            q = r.apply(&q)?;
            k = r.apply(&k)?;
        }
        let o = merge_heads(&sdpa(&q, &k, &v)?)?; // (b, n + s, inner)
        let (img_at, ctx_at) = match order {
            TokenOrder::ImageFirst => (0, n),
            TokenOrder::TextFirst => (s, 0),
        };
        let img = self.to_out.forward(&o.narrow(1, img_at, n)?)?;
        let ctx = match ctx_out {
            Some(l) => Some(l.forward(&o.narrow(1, ctx_at, s)?)?),
            None => None,
        };
        Ok((img, ctx))
    }
}
