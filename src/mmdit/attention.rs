//! Multi-head attention with optional per-head q/k RMSNorm, and the joint attention of MMDiT where
//! the image and text streams attend together over their concatenated tokens.

use super::rope::Rope;
use crate::nn::{
    join_heads, join_heads_with, linear_with, merge_heads, sdpa, split_tokens, Linear, RmsNorm,
};
use crate::profile::{self, Phase};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Where the text tokens go in the joint sequence: after the image (SD3) or before it (Flux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrder {
    ImageFirst,
    TextFirst,
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
    /// `names` = (q, k, v, norm_q, norm_k) weight names under `vb`; `bias`: the projections have
    /// biases (all but FLUX.2's).
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        bias: bool,
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
            q: linear_with(dim, inner, bias, vb.pp(names[0]))?,
            k: linear_with(dim, inner, bias, vb.pp(names[1]))?,
            v: linear_with(dim, inner, bias, vb.pp(names[2]))?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            heads,
        })
    }

    /// x: (b, n, dim) -> q, k, v each (b, h, n, d), q and k through their norms and rotated by
    /// `rope` when given ([`join_streams`] of one stream).
    pub fn forward(&self, x: &Tensor, rope: Option<&Rope>) -> Result<(Tensor, Tensor, Tensor)> {
        let t = self.project(x)?;
        join_streams(&[(self, &t)], rope, x.device())
    }

    /// x: (b, n, dim) -> q, k, v each token-major (b, n, h, d), as the projections write them,
    /// before the q/k norms (which act on each head's d values, in either layout).
    pub fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        profile::phase(Phase::QkvProjections, x.device(), || {
            let heads = |t: Tensor| {
                let d = t.dim(2)? / self.heads;
                t.reshape((b, n, self.heads, d))
            };
            Ok((
                heads(self.q.forward(x)?)?,
                heads(self.k.forward(x)?)?,
                heads(self.v.forward(x)?)?,
            ))
        })
    }
}

/// Streams' token-major q, k, v ([`QkvProj::project`], in the joint sequence's order) joined
/// head-major along the tokens, q and k through each stream's norms and the rotary embedding on
/// the way ([`join_heads_with`]: one pass on the CPU). Timed as the q/k norm phase where a stream
/// has norms, else as RoPE where there is one, else as copies.
fn join_streams(
    streams: &[(&QkvProj, &(Tensor, Tensor, Tensor))],
    rope: Option<&Rope>,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let phase = match (streams.iter().any(|(p, _)| p.norm_q.is_some()), rope) {
        (true, _) => Phase::QkNorm,
        (false, Some(_)) => Phase::Rope,
        (false, None) => Phase::Copies,
    };
    let tables = rope.map(|r| r.tables());
    let (q, k) = profile::phase(phase, dev, || {
        let qs: Vec<&Tensor> = streams.iter().map(|(_, t)| &t.0).collect();
        let ks: Vec<&Tensor> = streams.iter().map(|(_, t)| &t.1).collect();
        let nq: Vec<Option<&RmsNorm>> = streams.iter().map(|(p, _)| p.norm_q.as_ref()).collect();
        let nk: Vec<Option<&RmsNorm>> = streams.iter().map(|(p, _)| p.norm_k.as_ref()).collect();
        Ok((
            join_heads_with(&qs, &nq, tables)?,
            join_heads_with(&ks, &nk, tables)?,
        ))
    })?;
    let v = profile::phase(Phase::Copies, dev, || {
        join_heads(&streams.iter().map(|(_, t)| &t.2).collect::<Vec<_>>())
    })?;
    Ok((q, k, v))
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
    /// `joint`: has a context stream; `ctx_out`: the context stream has an output projection;
    /// `bias`: every projection has a bias (all but FLUX.2's).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        joint: bool,
        ctx_out: bool,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let img = QkvProj::new(
            dim,
            heads,
            head_dim,
            qk_norm,
            bias,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            &vb,
        )?;
        let to_out = linear_with(inner, dim, bias, vb.pp("to_out.0"))?;
        let ctx = if joint {
            let names = [
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "norm_added_q",
                "norm_added_k",
            ];
            let proj = QkvProj::new(dim, heads, head_dim, qk_norm, bias, names, &vb)?;
            let out = if ctx_out {
                Some(linear_with(inner, dim, bias, vb.pp("to_add_out"))?)
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
        let (q, k, v) = self.img.forward(x, None)?;
        let o = sdpa(&q, &k, &v)?;
        let o = profile::phase(Phase::Copies, x.device(), || merge_heads(&o))?;
        profile::phase(Phase::OutputProjections, x.device(), || {
            self.to_out.forward(&o)
        })
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
        let img = self.img.project(x)?;
        let txt = ctx_proj.project(ctx)?;
        // The joint sequence, head-major, in one pass over each of q, k, v.
        let streams = match order {
            TokenOrder::ImageFirst => [(&self.img, &img), (ctx_proj, &txt)],
            TokenOrder::TextFirst => [(ctx_proj, &txt), (&self.img, &img)],
        };
        let dev = x.device();
        let (q, k, v) = join_streams(&streams, rope, dev)?;
        let o = sdpa(&q, &k, &v)?;
        // Back to token-major rows (b, n, inner) and (b, s, inner), again one copy.
        let (o_img, o_ctx) = profile::phase(Phase::Copies, dev, || {
            Ok(match order {
                TokenOrder::ImageFirst => {
                    let [img, ctx] = split_tokens(&o, [n, s])?;
                    (img, ctx)
                }
                TokenOrder::TextFirst => {
                    let [ctx, img] = split_tokens(&o, [s, n])?;
                    (img, ctx)
                }
            })
        })?;
        profile::phase(Phase::OutputProjections, dev, || {
            let img = self.to_out.forward(&o_img)?;
            let ctx = match ctx_out {
                Some(l) => Some(l.forward(&o_ctx)?),
                None => None,
            };
            Ok((img, ctx))
        })
    }
}
