//! Multi-head attention with optional per-head q/k RMSNorm, and the joint attention of MMDiT where
//! the image and text streams attend together over their concatenated tokens.

use super::rope::Rope;
use crate::profile;
use candle_core::{DType, Module, Result, Tensor, D};

/// Where the text tokens go in the joint sequence: after the image (SD3) or before it (Flux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrder {
    ImageFirst,
    TextFirst,
}
use super::linear::{linear, Linear};
use candle_nn::VarBuilder;

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

    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// x: (..., dim). On a GPU one fused kernel (statistics in f32); on the CPU the composed f32
    /// path, or in bf16 one vectorised pass with the same roundings.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if !x.device().is_cpu() {
            return self.forward_fused(x);
        }
        if dtype == DType::BF16 {
            return crate::cpu::rms_norm_bf16(x, &self.weight, self.eps);
        }
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

impl RmsNorm {
    /// The fused path of [`RmsNorm::forward`] (any device; tested against the composed one).
    pub(crate) fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight.to_dtype(x.dtype())?,
            self.eps as f32,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_rms_norm_equals_the_composed_path() {
        let dev = Device::Cpu;
        let n = RmsNorm {
            weight: Tensor::randn(0f32, 1.0, 16, &dev).unwrap(),
            eps: 1e-6,
        };
        let x = (Tensor::randn(0f32, 1.0, (2, 3, 5, 16), &dev).unwrap() * 4.0).unwrap();
        let d: f32 = (n.forward(&x).unwrap() - n.forward_fused(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}

/// Scaled dot-product attention, timed as the transformer's "attention core" phase when profiling
/// (see [`sdpa_unprofiled`]).
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d) -> (b, h, n, d)
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    profile::phase(
        "attention core (scores, softmax, values)",
        q.device(),
        || sdpa_unprofiled(q, k, v),
    )
}

/// Scaled dot-product attention. On CUDA with the `flash-attn` feature (f16/bf16) it runs flash
/// attention, on Metal candle's fused kernel, on a CPU [`crate::cpu::attention`] (bf16 with AMX,
/// f32 with AVX-512); otherwise queries are processed in blocks so the score matrix never exceeds
/// a fixed budget (64 Mi scores on the CPU, 256 Mi on a GPU), with the softmax accumulating
/// in f32.
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d) -> (b, h, n, d)
pub fn sdpa_unprofiled(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    #[cfg(feature = "flash-attn")]
    if q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && d % 8 == 0
        && d <= 256
    {
        // flash attention takes (b, n, h, d).
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let o = candle_flash_attn::flash_attn(&t(q)?, &t(k)?, &t(v)?, scale as f32, false)?;
        return o.transpose(1, 2)?.contiguous();
    }
    #[cfg(feature = "metal")]
    if q.device().is_metal() && matches!(d, 32 | 64 | 72 | 80 | 96 | 128 | 256) {
        return candle_nn::ops::sdpa(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            None,
            false,
            scale as f32,
            1.0,
        );
    }
    if q.device().is_cpu() && q.dtype() == DType::BF16 && crate::cpu::amx::available() {
        let o = crate::cpu::with_slice::<half::bf16, _>(q, |q| {
            crate::cpu::with_slice::<half::bf16, _>(k, |k| {
                crate::cpu::with_slice::<half::bf16, _>(v, |v| {
                    crate::cpu::attention::sdpa_bf16(q, k, v, b * h, n, m, d, scale as f32)
                })
            })
        })???;
        return Tensor::from_vec(o, (b, h, n, d), q.device());
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 && crate::cpu::sgemm::available() {
        let o = crate::cpu::with_slice::<f32, _>(q, |q| {
            crate::cpu::with_slice::<f32, _>(k, |k| {
                crate::cpu::with_slice::<f32, _>(v, |v| {
                    crate::cpu::attention::sdpa_f32(q, k, v, b * h, n, m, d, scale as f32)
                })
            })
        })???;
        return Tensor::from_vec(o, (b, h, n, d), q.device());
    }
    let kt = k.transpose(2, 3)?.contiguous()?; // (b, h, d, m)
    let budget: usize = if q.device().is_cpu() {
        64 << 20
    } else {
        256 << 20
    };
    let block = (budget / (b * h * m).max(1)).clamp(1, n);
    // The scale is folded into q (n x d) rather than applied to the scores (n x m). On a GPU in
    // f16/bf16 the scores stay in that dtype (the matrix product already rounded them to it) and the
    // softmax kernel accumulates in f32; the CPU's softmax accumulates in the input dtype, so there
    // low-precision scores are converted to f32 first.
    let in_place = q.dtype() == DType::F32 || !q.device().is_cpu();
    let q = (q * scale)?;
    let mut outs = Vec::with_capacity(n.div_ceil(block));
    let mut start = 0;
    while start < n {
        let len = block.min(n - start);
        let scores = q.narrow(2, start, len)?.matmul(&kt)?; // (b, h, len, m)
        let probs = if in_place {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?
        };
        outs.push(probs.matmul(v)?); // (b, h, len, d)
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
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
            q: linear(dim, inner, vb.pp(names[0]))?,
            k: linear(dim, inner, vb.pp(names[1]))?,
            v: linear(dim, inner, vb.pp(names[2]))?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            heads,
        })
    }

    /// x: (b, n, dim) -> q, k, v each (b, h, n, d)
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = x.device();
        let (q, k, v) = profile::phase("q/k/v projections", dev, || {
            Ok((self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?))
        })?;
        let (mut q, mut k, v) = profile::phase("copies (heads, joins, splits)", dev, || {
            Ok((
                split_heads(&q, self.heads)?,
                split_heads(&k, self.heads)?,
                split_heads(&v, self.heads)?,
            ))
        })?;
        profile::phase("q/k RMSNorm", dev, || {
            if let Some(n) = &self.norm_q {
                q = n.forward(&q)?;
            }
            if let Some(n) = &self.norm_k {
                k = n.forward(&k)?;
            }
            Ok(())
        })?;
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
        let to_out = linear(inner, dim, vb.pp("to_out.0"))?;
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
                Some(linear(inner, dim, vb.pp("to_add_out"))?)
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
        let o = sdpa(&q, &k, &v)?;
        let o = profile::phase("copies (heads, joins, splits)", x.device(), || {
            merge_heads(&o)
        })?;
        profile::phase("output projections", x.device(), || self.to_out.forward(&o))
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
        let dev = x.device();
        let (mut q, mut k, v) = profile::phase("copies (heads, joins, splits)", dev, || {
            Ok((join(q, cq)?, join(k, ck)?, join(v, cv)?))
        })?;
        if let Some(r) = rope {
            (q, k) = profile::phase("RoPE", dev, || Ok((r.apply(&q)?, r.apply(&k)?)))?;
        }
        let o = sdpa(&q, &k, &v)?;
        let (img_at, ctx_at) = match order {
            TokenOrder::ImageFirst => (0, n),
            TokenOrder::TextFirst => (s, 0),
        };
        let (o_img, o_ctx) = profile::phase("copies (heads, joins, splits)", dev, || {
            let o = merge_heads(&o)?; // (b, n + s, inner)
            Ok((o.narrow(1, img_at, n)?, o.narrow(1, ctx_at, s)?))
        })?;
        profile::phase("output projections", dev, || {
            let img = self.to_out.forward(&o_img)?;
            let ctx = match ctx_out {
                Some(l) => Some(l.forward(&o_ctx)?),
                None => None,
            };
            Ok((img, ctx))
        })
    }
}
