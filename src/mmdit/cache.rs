//! Where a step cache reaches inside one transformer call: before the blocks (TeaCache, given the
//! first block's modulated image input), after the first block (first-block cache) and after the
//! last. The policies themselves are [`crate::cache`]'s; the transformers only run their blocks
//! through [`run_blocks`] (one stack, SD3) or [`run_two_stacks`] (FLUX's double then single
//! blocks).

use crate::profile::{self, Phase};
use candle_core::{Result, Tensor};

/// A step cache's hold on one transformer call. The tensors are the image stream, (b, n, dim) in
/// the run dtype: `img0` the blocks' input, `img1` the first block's output, `out` the last's.
pub trait BlockCache {
    /// Whether [`Self::before_blocks`] wants the first block's modulated image input (computing
    /// it costs a modulation and a norm).
    fn wants_modulated(&self) -> bool {
        false
    }

    /// Before any block runs: `Some(out)` skips them all, the image stream leaving as `out`.
    fn before_blocks(
        &mut self,
        _img0: &Tensor,
        _modulated: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// After the first block: `Some(out)` skips the rest.
    fn after_first(&mut self, _img0: &Tensor, _img1: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// After every block ran.
    fn after_all(&mut self, _img0: &Tensor, _img1: &Tensor, _out: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Runs a stack of blocks under a cache: `first` is the first block on (image, context),
/// `rest` the others, giving the image stream's output; `modulated` the first block's modulated
/// image input, computed only when the cache wants it.
pub fn run_blocks<C>(
    cache: Option<&mut dyn BlockCache>,
    img0: Tensor,
    ctx: C,
    modulated: impl FnOnce(&Tensor) -> Result<Tensor>,
    first: impl FnOnce(&Tensor, C) -> Result<(Tensor, C)>,
    rest: impl FnOnce(Tensor, C) -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(cache) = cache else {
        let (img1, ctx) = first(&img0, ctx)?;
        return rest(img1, ctx);
    };
    let m = match cache.wants_modulated() {
        true => Some(modulated(&img0)?),
        false => None,
    };
    if let Some(out) = cache.before_blocks(&img0, m.as_ref())? {
        return Ok(out);
    }
    let (img1, ctx) = first(&img0, ctx)?;
    if let Some(out) = cache.after_first(&img0, &img1)? {
        return Ok(out);
    }
    let out = rest(img1.clone(), ctx)?;
    cache.after_all(&img0, &img1, &out)?;
    Ok(out)
}

/// FLUX's blocks as one stack for [`run_blocks`]: `double(i, img, ctx)` runs double block `i`,
/// `single(i, joint)` single block `i` on the joint sequence (text first); returns the image
/// part of the last block's output. With no double block, the first single block is the first.
pub fn run_two_stacks(
    cache: Option<&mut dyn BlockCache>,
    (img, ctx): (Tensor, Tensor),
    (nd, ns): (usize, usize),
    modulated: impl FnOnce(&Tensor) -> Result<Tensor>,
    double: impl Fn(usize, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    single: impl Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let join = |img: &Tensor, ctx: &Tensor| {
        profile::phase(Phase::Copies, img.device(), || Tensor::cat(&[ctx, img], 1))
    };
    // From block `from` on (counting double blocks first) to the image stream's output.
    let from = |from: usize, mut img: Tensor, mut ctx: Tensor| -> Result<Tensor> {
        for i in from.min(nd)..nd {
            (img, ctx) = double(i, &img, &ctx)?;
        }
        let (s, n) = (ctx.dim(1)?, img.dim(1)?);
        let mut joint = join(&img, &ctx)?;
        for i in from.saturating_sub(nd)..ns {
            joint = single(i, &joint)?;
        }
        joint.narrow(1, s, n)
    };
    if cache.is_none() {
        return from(0, img, ctx);
    }
    run_blocks(
        cache,
        img,
        ctx,
        modulated,
        |img, ctx| match nd {
            0 => {
                let (s, n) = (ctx.dim(1)?, img.dim(1)?);
                let joint = single(0, &join(img, &ctx)?)?;
                Ok((joint.narrow(1, s, n)?, joint.narrow(1, 0, s)?))
            }
            _ => double(0, img, &ctx),
        },
        |img, ctx| from(1, img, ctx),
    )
}
