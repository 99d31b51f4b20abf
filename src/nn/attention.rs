//! Scaled dot-product attention on every backend, and the head split/merge around it.

use super::norm::RmsNorm;
use crate::profile::{self, Phase};
use candle_core::{DType, Result, Tensor};
use half::bf16;

/// Scaled dot-product attention, timed as the transformer's "attention core" phase when profiling
/// (see [`sdpa_unprofiled`]).
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d) -> (b, h, n, d)
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    profile::phase(Phase::AttentionCore, q.device(), || {
        sdpa_unprofiled(q, k, v)
    })
}

/// Scaled dot-product attention. On CUDA in f16/bf16 it runs cuDNN's fused attention
/// (`crate::cuda::sdpa`; with the `flash-attn` feature candle's flash attention instead), where
/// cuDNN can run the shape; on Metal candle's fused kernel, on a CPU [`crate::cpu::attention`] (bf16 with AMX,
/// bf16 with AVX512-BF16 but no AMX on its dot products, f32 with AVX-512, and bf16 with AVX-512
/// alone through the f32 kernel; on other CPUs f32 and bf16 on the `gemm` crate in the same order,
/// [`crate::cpu::attention::sdpa_gemm`], and f16 widened to f32 and run as f32, the output rounded
/// once); otherwise queries are processed in blocks so the score matrix never exceeds a fixed
/// budget (64 Mi scores on the CPU, 256 Mi on a GPU), with the softmax accumulating in f32.
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
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        if let Some(o) = crate::cuda::sdpa(q, k, v, scale as f32)? {
            return Ok(o);
        }
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
    let cpu = crate::cpu::features();
    let heads = crate::cpu::attention::Heads { bh: b * h, n, m, d };
    if q.device().is_cpu() && q.dtype() == DType::BF16 && cpu.amx {
        return on_slices(q, k, v, |q, k, v| {
            crate::cpu::attention::sdpa_bf16(q, k, v, heads, scale as f32)
        });
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 && cpu.avx512 {
        return on_slices(q, k, v, |q, k, v| {
            crate::cpu::attention::sdpa_f32(q, k, v, heads, scale as f32)
        });
    }
    if q.device().is_cpu() && q.dtype() == DType::BF16 && cpu.bf16_dot {
        return on_slices(q, k, v, |q, k, v| {
            crate::cpu::attention::sdpa_dpbf16(q, k, v, heads, scale as f32)
        });
    }
    if q.device().is_cpu() && q.dtype() == DType::BF16 && cpu.avx512 {
        // No AMX nor a fast AVX512-BF16: the f32 kernel on the (exactly widened) bf16 values, the
        // output rounded once; candle's bf16 products would round the scores to bf16 before the
        // softmax.
        return on_slices(q, k, v, |q, k, v| {
            crate::cpu::attention::sdpa_widened(q, k, v, heads, scale as f32)
        });
    }
    if q.device().is_cpu() {
        // The kernels' semantics without them, on the `gemm` crate: the f32 attention of the
        // (exactly widened) values, the output rounded once. (candle's bf16 products would round
        // the scaled queries and the scores, beyond bf16 rounding of the output.)
        use crate::cpu::attention::sdpa_gemm as gemm;
        match q.dtype() {
            DType::F32 => {
                return on_slices::<f32>(q, k, v, |q, k, v| {
                    gemm(q, k, v, heads, scale as f32, None)
                })
            }
            DType::BF16 => {
                return on_slices::<bf16>(q, k, v, |q, k, v| {
                    gemm(q, k, v, heads, scale as f32, None)
                })
            }
            DType::F16 => {
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                return sdpa_unprofiled(&f(q)?, &f(k)?, &f(v)?)?.to_dtype(q.dtype());
            }
            _ => {}
        }
    }
    // q and v may be head-major views of token-major tensors ([`join_heads`] on a GPU): the
    // products take them contiguous.
    let (q, v) = (&q.contiguous()?, &v.contiguous()?);
    let kt = k.transpose(2, 3)?.contiguous()?; // (b, h, d, m)
    let budget: usize = if q.device().is_cpu() {
        64 << 20
    } else {
        256 << 20
    };
    let block = (budget / (b * h * m).max(1)).clamp(1, n);
    // The scale is folded into q (n x d) rather than applied to the scores (n x m). On a GPU in
    // f16/bf16 the scores stay in that dtype (the matrix product already rounded them to it) and the
    // softmax kernel accumulates in f32 (a CPU's softmax accumulates in the input dtype: the CPU
    // came here in f32, above).
    let q = (q * scale)?;
    let mut outs = Vec::with_capacity(n.div_ceil(block));
    let mut start = 0;
    while start < n {
        let len = block.min(n - start);
        let scores = q.narrow(2, start, len)?.matmul(&kt)?; // (b, h, len, m)
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(v)?); // (b, h, len, d)
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 2)
}

/// `softmax(q kᵀ · scale + bias) v`: T5's attention (its relative-position bias with the key mask
/// folded in, per head) and a language model's (its causal and padding mask, one for all heads,
/// `-inf` where a key is hidden). On a CPU with AVX-512 the fused attentions with the bias in f32,
/// added to the scaled f32 scores (no score matrix beyond one block of queries): f32
/// ([`crate::cpu::attention::sdpa_f32_biased`]), bf16 as [`sdpa`] runs it (AMX,
/// [`crate::cpu::attention::sdpa_bf16_biased`]; fast AVX512-BF16,
/// [`crate::cpu::attention::sdpa_dpbf16_biased`]; else the inputs widened exactly and the output
/// rounded once, [`crate::cpu::attention::sdpa_widened_biased`]). On other CPUs f32 and bf16 on the `gemm` crate in the same order
/// ([`crate::cpu::attention::sdpa_gemm`]), f16 widened and run as f32 (the output rounded once);
/// on GPUs composed in q's dtype, the bias converted to it.
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d), bias: (1, h or 1, n, m) -> (b, h, n, d)
pub fn sdpa_biased(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let (one, hb, bn, bm) = bias.dims4()?;
    if one != 1 || (hb != 1 && hb != h) || (bn, bm) != (n, m) {
        candle_core::bail!(
            "attention bias {:?} is not (1, {h} or 1, {n}, {m})",
            bias.dims()
        );
    }
    let dt = q.dtype();
    let same = [k, v].iter().all(|t| t.dtype() == dt);
    if q.device().is_cpu() && same && crate::cpu::features().avx512 {
        let heads = crate::cpu::attention::Heads { bh: b * h, n, m, d };
        let bias = bias.to_dtype(DType::F32)?;
        match dt {
            DType::F32 => {
                return crate::cpu::with_slice::<f32, _>(&bias, |bias| {
                    on_slices(q, k, v, |q, k, v| {
                        crate::cpu::attention::sdpa_f32_biased(q, k, v, heads, scale as f32, bias)
                    })
                })?;
            }
            DType::BF16 => {
                // As the unbiased attention: AMX, else fast AVX512-BF16 dot products, else the
                // f32 kernel on the widened values.
                use crate::cpu::attention::sdpa_widened_biased;
                use crate::cpu::attention::{sdpa_bf16_biased, sdpa_dpbf16_biased};
                let cpu = crate::cpu::features();
                let kernel = match (cpu.amx, cpu.bf16_dot) {
                    (true, _) => sdpa_bf16_biased,
                    (false, true) => sdpa_dpbf16_biased,
                    (false, false) => sdpa_widened_biased,
                };
                return crate::cpu::with_slice::<f32, _>(&bias, |bias| {
                    on_slices(q, k, v, |q, k, v| {
                        kernel(q, k, v, heads, scale as f32, bias)
                    })
                })?;
            }
            _ => {}
        }
    }
    if q.device().is_cpu() && same {
        // Without AVX-512 the same order on the `gemm` crate.
        let heads = crate::cpu::attention::Heads { bh: b * h, n, m, d };
        use crate::cpu::attention::sdpa_gemm as gemm;
        let bias32 = bias.to_dtype(DType::F32)?;
        match dt {
            DType::F32 => {
                return crate::cpu::with_slice::<f32, _>(&bias32, |bias| {
                    on_slices::<f32>(q, k, v, |q, k, v| {
                        gemm(q, k, v, heads, scale as f32, Some(bias))
                    })
                })?;
            }
            DType::BF16 => {
                return crate::cpu::with_slice::<f32, _>(&bias32, |bias| {
                    on_slices::<bf16>(q, k, v, |q, k, v| {
                        gemm(q, k, v, heads, scale as f32, Some(bias))
                    })
                })?;
            }
            _ => {}
        }
    }
    if q.device().is_cpu() && dt == DType::F16 {
        // As the kernels: the f32 attention of the widened values, the output rounded once.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return sdpa_biased(&f(q)?, &f(k)?, &f(v)?, bias, scale)?.to_dtype(dt);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias.to_dtype(dt)?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

/// Runs a CPU attention kernel of element type T on q, k and v as slices; its output has q's shape.
fn on_slices<T: candle_core::WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kernel: impl FnOnce(&[T], &[T], &[T]) -> Vec<T>,
) -> Result<Tensor> {
    use crate::cpu::with_slice;
    let o = with_slice::<T, _>(q, |qs| {
        with_slice::<T, _>(k, |ks| with_slice::<T, _>(v, |vs| kernel(qs, ks, vs)))
    })???;
    Tensor::from_vec(o, q.shape(), q.device())
}

/// (b, n, h*d) -> (b, h, n, d), contiguous: on the CPU one parallel copy ([`join_heads`] of the
/// one part; candle's copy runs on the calling thread while the pool waits).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = x.dims3()?;
    let x = x.reshape((b, n, heads, hd / heads.max(1)))?;
    match x.device().is_cpu() {
        true => join_heads(&[&x])?.contiguous(),
        false => x.transpose(1, 2)?.contiguous(),
    }
}

/// (b, h, n, d) -> (b, n, h*d): on the CPU contiguous, one parallel copy ([`split_tokens`] into
/// one part, for the output projection that reads it next); elsewhere a view.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        let [merged] = split_tokens(x, [n])?;
        return Ok(merged);
    }
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

/// Token-major parts (b, n_i, h, d) joined along the tokens, head-major: (b, h, Σ n_i, d). On the
/// CPU one copy ([`crate::cpu::heads`]), contiguous; elsewhere the parts concatenated token-major
/// (one copy; none for a single part) and viewed head-major, strided: cuDNN's attention takes the
/// strides, and [`sdpa`]'s other paths make contiguous what they need.
pub fn join_heads(parts: &[&Tensor]) -> Result<Tensor> {
    let ((b, h, d), lens) = token_parts(parts, "join_heads")?;
    let first = parts[0];
    let total = lens.iter().sum::<usize>();
    fn on_cpu<T: candle_core::WithDType>(
        parts: &[&Tensor],
        lens: &[usize],
        (b, h, total, d): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let out = crate::cpu::with_slices::<T, _>(parts, |xs| {
            crate::cpu::heads::join_heads(xs, lens, b, h, d)
        })?;
        Tensor::from_vec(out, (b, h, total, d), &candle_core::Device::Cpu)
    }
    let dims = (b, h, total, d);
    match (first.device().is_cpu(), first.dtype()) {
        (true, DType::F32) => on_cpu::<f32>(parts, &lens, dims),
        (true, DType::BF16) => on_cpu::<half::bf16>(parts, &lens, dims),
        (true, DType::F16) => on_cpu::<half::f16>(parts, &lens, dims),
        _ => join_token_major(parts),
    }
}

/// [`join_heads`] of token-major parts each through its per-head RMSNorm (`norms[i]`, or none),
/// then rotated by joined token with the rotary tables `rope` (cos, sin: (Σ n_i, d / 2) f32,
/// [`crate::nn::rotate_pairs`]), or not: MMDiT's q and k on their way into the attention. On the
/// CPU in f32 and bf16 one pass ([`crate::cpu::heads::join_heads_with`]) giving the values of the
/// three ops one after the other, which run elsewhere.
pub fn join_heads_with(
    parts: &[&Tensor],
    norms: &[Option<&RmsNorm>],
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    if norms.len() != parts.len() {
        candle_core::bail!(
            "join_heads_with: {} parts, {} norms",
            parts.len(),
            norms.len()
        );
    }
    let ((b, h, d), lens) = token_parts(parts, "join_heads_with")?;
    let first = parts[0];
    let total: usize = lens.iter().sum();
    let tables_fit = rope.is_none_or(|(c, s)| {
        c.dims() == [total, d / 2] && s.dims() == [total, d / 2] && d % 2 == 0
    });
    let norms_fit = norms
        .iter()
        .all(|n| n.is_none_or(|n| n.parts().0.dims() == [d]));
    if !tables_fit || !norms_fit {
        candle_core::bail!(
            "join_heads_with: norms or rotary tables do not fit {:?}",
            first.shape()
        );
    }
    let f32_tables = rope.is_none_or(|(c, s)| c.dtype() == DType::F32 && s.dtype() == DType::F32);
    fn on_cpu<T: crate::cpu::rope::Pairs + crate::cpu::elementwise::RowPasses>(
        parts: &[&Tensor],
        norms: &[Option<&RmsNorm>],
        rope: Option<(&Tensor, &Tensor)>,
        lens: &[usize],
        (b, h, total, d): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        use crate::cpu::with_slice;
        let weights: Vec<Option<Vec<f32>>> = norms
            .iter()
            .map(|n| {
                n.map(|n| n.parts().0.to_dtype(DType::F32)?.to_vec1())
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let weights: Vec<Option<&[f32]>> = weights.iter().map(|w| w.as_deref()).collect();
        let eps = norms
            .iter()
            .flatten()
            .map(|n| n.parts().1)
            .next()
            .unwrap_or(0.0);
        if norms.iter().flatten().any(|n| n.parts().1 != eps) {
            candle_core::bail!("join_heads_with: norms of different epsilons");
        }
        let run = |rope: Option<(&[f32], &[f32])>| {
            crate::cpu::with_slices::<T, _>(parts, |xs| {
                let ops = crate::cpu::heads::RowOps {
                    norms: &weights,
                    eps: eps as f32,
                    rope,
                };
                crate::cpu::heads::join_heads_with(xs, lens, (b, h, d), &ops)
            })
        };
        let out = match rope {
            Some((c, s)) => {
                with_slice::<f32, _>(c, |c| with_slice::<f32, _>(s, |s| run(Some((c, s)))))???
            }
            None => run(None)?,
        };
        Tensor::from_vec(out, (b, h, total, d), &candle_core::Device::Cpu)
    }
    let dims = (b, h, total, d);
    match (first.device().is_cpu() && f32_tables, first.dtype()) {
        (true, DType::F32) => on_cpu::<f32>(parts, norms, rope, &lens, dims),
        (true, DType::BF16) => on_cpu::<half::bf16>(parts, norms, rope, &lens, dims),
        _ => {
            let normed: Vec<Tensor> = parts
                .iter()
                .zip(norms)
                .map(|(p, n)| match n {
                    Some(n) => n.forward(p),
                    None => Ok((*p).clone()),
                })
                .collect::<Result<_>>()?;
            let joined = join_heads(&normed.iter().collect::<Vec<_>>())?;
            match rope {
                Some((c, s)) => crate::nn::rotate_pairs(&joined, c, s),
                None => Ok(joined),
            }
        }
    }
}

/// Token-major parts' (b, n_i, h, d): their common (b, h, d) and each n_i, or an error naming `op`
/// unless there is a part and all share b, h, d and the dtype.
fn token_parts(parts: &[&Tensor], op: &str) -> Result<((usize, usize, usize), Vec<usize>)> {
    let Some(&first) = parts.first() else {
        candle_core::bail!("{op}: no parts")
    };
    let (b, _, h, d) = first.dims4()?;
    let mut lens = Vec::with_capacity(parts.len());
    for p in parts {
        let (pb, n, ph, pd) = p.dims4()?;
        if (pb, ph, pd) != (b, h, d) || p.dtype() != first.dtype() {
            candle_core::bail!(
                "{op}: parts {:?} {:?} and {:?} {:?}",
                first.shape(),
                first.dtype(),
                p.shape(),
                p.dtype()
            );
        }
        lens.push(n);
    }
    Ok(((b, h, d), lens))
}

/// [`join_heads`] off the CPU: the token-major parts concatenated, viewed head-major.
fn join_token_major(parts: &[&Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 1)?.transpose(1, 2)
}

/// [`merge_heads`] of `x` with `extra` appended along the last axis: (b, h, n, d) and (b, n, e) ->
/// (b, n, h·d + e), a single-stream block's attention output and MLP activations joined for its
/// output projection. On the CPU one copy ([`crate::cpu::heads`]); elsewhere concatenated.
pub fn merge_heads_with(x: &Tensor, extra: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    let (eb, en, e) = extra.dims3()?;
    if (eb, en) != (b, n) || extra.dtype() != x.dtype() {
        candle_core::bail!(
            "merge_heads_with: {:?} {:?} and {:?} {:?}",
            x.shape(),
            x.dtype(),
            extra.shape(),
            extra.dtype()
        );
    }
    fn on_cpu<T: candle_core::WithDType>(
        x: &Tensor,
        extra: &Tensor,
        dims: (usize, usize, usize, usize),
        e: usize,
    ) -> Result<Tensor> {
        let out = crate::cpu::with_slices::<T, _>(&[x, extra], |xs| {
            crate::cpu::heads::merge_heads_with(xs[0], xs[1], dims, e)
        })?;
        let (b, h, n, d) = dims;
        Tensor::from_vec(out, (b, n, h * d + e), &candle_core::Device::Cpu)
    }
    let dims = (b, h, n, d);
    match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32) => on_cpu::<f32>(x, extra, dims, e),
        (true, DType::BF16) => on_cpu::<half::bf16>(x, extra, dims, e),
        (true, DType::F16) => on_cpu::<half::f16>(x, extra, dims, e),
        _ => Tensor::cat(&[&merge_heads(x)?, extra], candle_core::D::Minus1),
    }
}

/// Head-major `x` (b, h, Σ lens, d) split along the tokens into token-major parts (b, lens[i],
/// h·d), each contiguous: [`merge_heads`] and a narrow of each part. On the CPU one copy
/// ([`crate::cpu::heads`]).
pub fn split_tokens<const N: usize>(x: &Tensor, lens: [usize; N]) -> Result<[Tensor; N]> {
    let (b, h, total, d) = x.dims4()?;
    if lens.iter().sum::<usize>() != total {
        candle_core::bail!("split_tokens: {lens:?} tokens of {:?}", x.shape());
    }
    fn on_cpu<T: candle_core::WithDType>(
        x: &Tensor,
        lens: &[usize],
        (b, h, d): (usize, usize, usize),
    ) -> Result<Vec<Tensor>> {
        let parts = crate::cpu::with_slice::<T, _>(x, |xs| {
            crate::cpu::heads::split_tokens(xs, lens, b, h, d)
        })?;
        parts
            .into_iter()
            .zip(lens)
            .map(|(p, &n)| Tensor::from_vec(p, (b, n, h * d), &candle_core::Device::Cpu))
            .collect()
    }
    let parts = match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32) => on_cpu::<f32>(x, &lens, (b, h, d))?,
        (true, DType::BF16) => on_cpu::<half::bf16>(x, &lens, (b, h, d))?,
        (true, DType::F16) => on_cpu::<half::f16>(x, &lens, (b, h, d))?,
        _ => {
            let merged = merge_heads(x)?;
            let mut first = 0;
            lens.iter()
                .map(|&n| {
                    let part = merged.narrow(1, first, n)?.contiguous();
                    first += n;
                    part
                })
                .collect::<Result<_>>()?
        }
    };
    let mut parts = parts.into_iter();
    Ok(std::array::from_fn(|_| {
        parts.next().expect("one part per length")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::normal;

    /// A mask shared by every head ((1, 1, n, m), causal, -inf where hidden) against the composed
    /// ops in f32 (within f32 summation error), and in bf16 within bf16 rounding of that; a bias of
    /// another shape is an error.
    #[test]
    fn sdpa_biased_with_one_mask_for_all_heads_equals_the_composed_ops() {
        let (b, h, n, m, d) = (2, 3, 9, 11, 16);
        let (q, k, v) = (
            normal((b, h, n, d), 1.0, 3),
            normal((b, h, m, d), 1.0, 4),
            normal((b, h, m, d), 1.0, 5),
        );
        let mask: Vec<f32> = (0..n * m)
            .map(|ij| match ij % m <= ij / m + 2 {
                true => 0.0,
                false => f32::NEG_INFINITY,
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, n, m), q.device()).unwrap();
        let scale = 0.25;
        let scores = ((q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap())
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        let got = sdpa_biased(&q, &k, &v, &mask, scale).unwrap();
        let diff = |a: &Tensor| {
            let a = a.to_dtype(DType::F32).unwrap();
            crate::nn::test_util::max_abs_diff(&a, &want)
        };
        assert!(diff(&got) <= 1e-5, "f32: {}", diff(&got));
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = sdpa_biased(&bf(&q), &bf(&k), &bf(&v), &mask, scale).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(diff(&got) <= 0.03, "bf16: {}", diff(&got));
        let wrong = Tensor::zeros((1, 2, n, m), DType::F32, q.device()).unwrap();
        assert!(sdpa_biased(&q, &k, &v, &wrong, scale).is_err());
    }

    /// The one-copy CPU layout changes against the composed ops (split the heads and concatenate;
    /// merge the heads and narrow), bit for bit, in f32 and bf16.
    #[test]
    fn join_heads_with_equals_norms_then_join_then_rotation() {
        use crate::nn::{rotate_pairs, RmsNorm};
        let bits = crate::nn::test_util::bits;
        let (h, d) = (3, 8);
        let angles = Tensor::arange(0f32, (9 * d / 2) as f32, &candle_core::Device::Cpu)
            .unwrap()
            .affine(0.37, 0.1)
            .unwrap()
            .reshape((9, d / 2))
            .unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for dtype in [DType::F32, DType::BF16] {
            let img = normal((2, 5, h, d), 2.0, 1).to_dtype(dtype).unwrap();
            let txt = normal((2, 4, h, d), 2.0, 2).to_dtype(dtype).unwrap();
            let norm =
                |seed| RmsNorm::from_weight(normal(d, 1.0, seed).to_dtype(dtype).unwrap(), 1e-6);
            let (ni, nt) = (norm(3), norm(4));
            for (norms, rope) in [
                ([Some(&nt), Some(&ni)], Some((&cos, &sin))),
                ([None, Some(&ni)], None),
                ([None, None], Some((&cos, &sin))),
            ] {
                let got = join_heads_with(&[&txt, &img], &norms, rope).unwrap();
                let normed: Vec<Tensor> = [&txt, &img]
                    .iter()
                    .zip(norms)
                    .map(|(p, n)| n.map_or(Ok((*p).clone()), |n| n.forward(p)).unwrap())
                    .collect();
                let mut want = join_heads(&[&normed[0], &normed[1]]).unwrap();
                if let Some((c, s)) = rope {
                    want = rotate_pairs(&want, c, s).unwrap();
                }
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got), bits(&want), "{dtype:?}");
            }
            let short = angles.narrow(0, 0, 8).unwrap();
            assert!(join_heads_with(&[&txt, &img], &[None, None], Some((&short, &short))).is_err());
            assert!(join_heads_with(&[&txt, &img], &[None], None).is_err());
        }
    }

    #[test]
    fn join_heads_and_split_tokens_equal_the_composed_ops() {
        let eq = |a: &Tensor, b: &Tensor| {
            let v = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(a.dims(), b.dims());
            assert_eq!(v(a), v(b));
        };
        // candle's views made contiguous: what split_heads and merge_heads copy on the CPU.
        let composed_split = |t: &Tensor, h: usize| {
            let (b, n, hd) = t.dims3().unwrap();
            let t = t.reshape((b, n, h, hd / h)).unwrap();
            t.transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let composed_merge = |t: &Tensor| {
            let (b, h, n, d) = t.dims4().unwrap();
            let t = t.transpose(1, 2).unwrap().contiguous().unwrap();
            t.reshape((b, n, h * d)).unwrap()
        };
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::U32] {
            let x = normal((2, 7, 15), 4.0, 4).to_dtype(dtype).unwrap();
            let split = split_heads(&x, 3).unwrap();
            assert!(split.is_contiguous());
            eq(&split, &composed_split(&x, 3));
            eq(&merge_heads(&split).unwrap(), &x);
            eq(&merge_heads(&split).unwrap(), &composed_merge(&split));
        }
        for dtype in [DType::F32, DType::BF16] {
            let (h, d) = (3, 8);
            let img = normal((2, 5, h * d), 1.0, 1).to_dtype(dtype).unwrap();
            let txt = normal((2, 4, h * d), 1.0, 2).to_dtype(dtype).unwrap();
            let tokens = |t: &Tensor| t.reshape((2, t.dim(1).unwrap(), h, d)).unwrap();
            let joined = join_heads(&[&tokens(&txt), &tokens(&img)]).unwrap();
            let want = Tensor::cat(&[composed_split(&txt, h), composed_split(&img, h)], 2).unwrap();
            eq(&joined, &want);
            let strided = join_token_major(&[&tokens(&txt), &tokens(&img)]).unwrap();
            eq(&strided, &want);
            // The attention of the strided view (as a GPU's join leaves it) is that of the copy.
            eq(
                &sdpa(&strided, &strided, &strided).unwrap(),
                &sdpa(&want, &want, &want).unwrap(),
            );
            let [a, b] = split_tokens(&joined, [4, 5]).unwrap();
            eq(&a, &txt);
            eq(&b, &img);
            let merged = composed_merge(&want);
            eq(&b, &merged.narrow(1, 4, 5).unwrap());
            assert!(split_tokens(&joined, [4, 4]).is_err());
            let mlp = normal((2, 9, 11), 1.0, 3).to_dtype(dtype).unwrap();
            eq(
                &merge_heads_with(&want, &mlp).unwrap(),
                &Tensor::cat(&[&merged, &mlp], 2).unwrap(),
            );
            assert!(merge_heads_with(&want, &mlp.narrow(1, 0, 8).unwrap()).is_err());
        }
    }

    /// bf16 on the CPU (AMX tiles, AVX512-BF16, the f32 kernel, or candle's blocked path): within
    /// bf16 rounding of the probabilities and of the output of the f32 attention of the same values.
    #[test]
    fn bf16_attention_stays_within_bf16_rounding_of_f32() {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let (q, k, v) = (
            bf(normal((2, 3, 70, 32), 1.5, 1)),
            bf(normal((2, 3, 90, 32), 1.5, 2)),
            bf(normal((2, 3, 90, 32), 1.5, 3)),
        );
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let scale = 1.0 / (32f64).sqrt();
        let scores = ((f(&q) * scale).unwrap())
            .matmul(&f(&k).transpose(2, 3).unwrap().contiguous().unwrap())
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&f(&v))
            .unwrap();
        let got = f(&sdpa_unprofiled(&q, &k, &v).unwrap());
        let tol = ((want.abs().unwrap() * 2f64.powi(-8)).unwrap() + 6.0 * 2f64.powi(-9)).unwrap();
        let excess: f32 = ((got - &want).unwrap().abs().unwrap() - tol)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(excess <= 0.0, "beyond bf16 rounding by {excess}");
    }
}
