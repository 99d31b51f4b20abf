//! The denoising loop around a family's transformer: seeded noise, classifier-free guidance, the
//! sampler over the schedule with each step timed, and the checks for non-finite values.

use super::family::{Cfg, Denoise};
use crate::cache::{CacheSpec, CallKind, StepCache};
use crate::error::{Error, Result};
use crate::mmdit::cache::BlockCache;
use crate::request::Resolved;
use crate::sampling::{Schedule, Velocity};
use crate::text::Conditioning;
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

/// Standard-normal latents from a seed (our own generator: seeds do not reproduce torch's noise;
/// pass the noise itself for that).
pub fn seeded_noise(
    seed: u64,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The seed of an edit's latent-distribution noise for its `stream`-th encoding: streams apart from
/// the initial noise's.
pub fn encode_noise_seed(seed: u64, stream: u64) -> u64 {
    seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(stream + 1)
}

/// A model whose input carries extra channels after the latents' (FLUX.1 Fill's masked image and
/// mask), the same at every step.
pub(super) struct WithChannels<'a> {
    inner: Box<dyn Denoise + 'a>,
    /// (1, extra, h, w) in the run dtype.
    channels: Tensor,
}

impl<'a> WithChannels<'a> {
    pub fn new(inner: Box<dyn Denoise + 'a>, channels: Tensor) -> Self {
        Self { inner, channels }
    }
}

impl Denoise for WithChannels<'_> {
    fn velocity(
        &self,
        x: &Tensor,
        t: f32,
        cond: &Conditioning,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let extra = self
            .channels
            .broadcast_as((b, self.channels.dim(1)?, h, w))?;
        self.inner
            .velocity(&Tensor::cat(&[x, &extra.contiguous()?], 1)?, t, cond, cache)
    }
}

/// Fails with a clear error if `x` holds a NaN or an infinity (their sum is then not finite).
pub fn check_finite(x: &Tensor, what: &'static str, step: usize, dtype: DType) -> Result<()> {
    let s: f32 = x.to_dtype(DType::F32)?.sum_all()?.to_scalar()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what,
            step: step + 1,
            dtype: crate::device::dtype_name(dtype).into(),
        })
    }
}

/// A request's prompts, encoded: the negative one only when guidance runs.
pub struct Prompts {
    pub pos: Conditioning,
    pub neg: Option<Conditioning>,
}

impl Prompts {
    /// The prompts repeated for a batch of `n` images.
    pub fn repeated(&self, n: usize) -> Result<Self> {
        let rep = |c: &Conditioning| -> Result<Conditioning> {
            let expand = |t: &Tensor| -> Result<Tensor> {
                let mut dims = t.dims().to_vec();
                dims[0] = n;
                Ok(t.broadcast_as(dims)?.contiguous()?)
            };
            Ok(Conditioning {
                context: expand(&c.context)?,
                pooled: expand(&c.pooled)?,
            })
        };
        Ok(Self {
            pos: rep(&self.pos)?,
            neg: self.neg.as_ref().map(rep).transpose()?,
        })
    }
}

/// How the guided velocity calls the model.
enum Mode<'a> {
    Unguided(&'a Conditioning),
    /// [negative, positive] as one batch of two.
    Batched(Conditioning, f64),
    /// Two calls.
    Separate(&'a Conditioning, &'a Conditioning, f64),
}

/// A family's transformer with classifier-free guidance, as the sampler sees it: f32 latents in,
/// the model run in `dtype`, f32 velocity out; under a step cache, one per model call branch.
pub(super) struct Guided<'a> {
    model: &'a dyn Denoise,
    mode: Mode<'a>,
    dtype: DType,
    /// [branch] (one) or [positive, negative] (two calls).
    caches: Vec<StepCache>,
}

impl<'a> Guided<'a> {
    pub fn new(
        model: &'a dyn Denoise,
        prompts: &'a Prompts,
        cfg: Option<Cfg>,
        dtype: DType,
        cache: Option<(CacheSpec, usize, &'static [f64])>,
    ) -> Result<Self> {
        let mode = match (cfg, &prompts.neg) {
            (Some(c), Some(neg)) if c.batched => {
                let both = Conditioning {
                    context: Tensor::cat(&[&neg.context, &prompts.pos.context], 0)?,
                    pooled: Tensor::cat(&[&neg.pooled, &prompts.pos.pooled], 0)?,
                };
                Mode::Batched(both, c.scale)
            }
            (Some(c), Some(neg)) => Mode::Separate(&prompts.pos, neg, c.scale),
            _ => Mode::Unguided(&prompts.pos),
        };
        let branches = match mode {
            Mode::Separate(..) => 2,
            _ => 1,
        };
        let caches = match cache {
            Some((spec, calls, rescale)) => (0..branches)
                .map(|_| StepCache::new(spec, calls, rescale))
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            model,
            mode,
            dtype,
            caches,
        })
    }

    /// What each model call cost, per branch (empty without a cache).
    pub fn cache_calls(&self) -> Vec<Vec<CallKind>> {
        self.caches.iter().map(|c| c.kinds.clone()).collect()
    }

    /// The model's velocity for `x` on `cond`, through branch `k`'s cache when there is one.
    fn call(&mut self, k: usize, x: &Tensor, t: f32, cond: &Conditioning) -> Result<Tensor> {
        let model = self.model;
        match self.caches.get_mut(k) {
            Some(c) => c.call(&mut |hook| model.velocity(x, t, cond, hook)),
            None => model.velocity(x, t, cond, None),
        }
    }
}

/// `neg + scale (pos - neg)`
fn combine(neg: &Tensor, pos: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((neg + ((pos - neg)? * scale)?)?)
}

impl Velocity for Guided<'_> {
    fn velocity(&mut self, x: &Tensor, _sigma: f32, t: f32, step: usize) -> Result<Tensor> {
        crate::interrupt::check()?;
        let x = x.to_dtype(self.dtype)?;
        let v = match self.mode {
            Mode::Unguided(c) => self.call(0, &x, t, c)?,
            Mode::Batched(ref both, scale) => {
                // [negatives; positives], each half the batch of x.
                let b = x.dim(0)?;
                let both = both.clone();
                let v = self.call(0, &Tensor::cat(&[&x, &x], 0)?, t, &both)?;
                let (neg, pos) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
                combine(&neg, &pos, scale)?
            }
            Mode::Separate(pos, neg, scale) => {
                let vp = self.call(0, &x, t, pos)?;
                let vn = self.call(1, &x, t, neg)?;
                combine(&vn, &vp, scale)?
            }
        };
        let v = v.to_dtype(DType::F32)?;
        check_finite(&v, "velocity", step, self.dtype)?;
        Ok(v)
    }
}

/// Inpainting as diffusers does it: after each step, outside the mask the latents are put back on
/// the input image's path: its latents noised to the next step's sigma with the initial noise
/// (clean after the last step).
pub(super) struct Blend {
    /// The input's latents in sampler space, (1, C, h, w) f32.
    pub image: Tensor,
    pub noise: Tensor,
    /// 1 where the model repaints, 0 where the input is kept; (1, 1, h, w) f32.
    pub mask: Tensor,
}

impl Blend {
    fn apply(&self, x: Tensor, next_sigma: f32) -> Result<Tensor> {
        let s = f64::from(next_sigma);
        let kept = ((&self.noise * s)? + (&self.image * (1.0 - s))?)?;
        let keep = (1.0 - &self.mask)?;
        Ok((kept.broadcast_mul(&keep)? + x.broadcast_mul(&self.mask)?)?)
    }
}

/// Wraps a model so each completed step is timed and reported (and blended, when inpainting).
struct Timed<'a> {
    inner: &'a mut dyn Velocity,
    blend: Option<&'a Blend>,
    sigmas: &'a [f32],
    device: Device,
    last: Instant,
    steps: Vec<Duration>,
    observer: &'a mut dyn Observer,
    /// The step whose prediction of the final latents is taken, and the prediction.
    predicted: Option<(usize, Tensor)>,
}

/// What a caller sees of the sampling: each step's end, and, when it asks, each step's prediction
/// of the final latents (for previews). Any `FnMut(usize)` observes the steps alone.
pub trait Observer {
    /// After step `i` (0-based) of the steps that run.
    fn step(&mut self, i: usize);
    /// Whether to be handed step `i`'s prediction (a few tensor operations more).
    fn wants_prediction(&self, _i: usize) -> bool {
        false
    }
    /// Step `i`'s prediction of the final latents from its first model call, `x - σ v`
    /// ((1, C, h, w) f32, sampler space), before [`Observer::step`].
    fn prediction(&mut self, _i: usize, _x0: &Tensor) {}
}

impl<F: FnMut(usize)> Observer for F {
    fn step(&mut self, i: usize) {
        self(i)
    }
}

impl Velocity for Timed<'_> {
    fn velocity(&mut self, x: &Tensor, sigma: f32, timestep: f32, step: usize) -> Result<Tensor> {
        let v = self.inner.velocity(x, sigma, timestep, step)?;
        let first = self.predicted.as_ref().is_none_or(|(s, _)| *s != step);
        if first && self.observer.wants_prediction(step) {
            let x0 = (x.to_dtype(DType::F32)? - (v.to_dtype(DType::F32)? * f64::from(sigma))?)?;
            self.predicted = Some((step, x0));
        }
        Ok(v)
    }

    fn end_step(&mut self, step: usize, x: Tensor) -> Result<Tensor> {
        let mut x = self.inner.end_step(step, x)?;
        if let Some(b) = self.blend {
            x = b.apply(x, self.sigmas[step + 1])?;
        }
        // GPU work is asynchronous: wait for the step to finish before reading the clock.
        let _ = self.device.synchronize();
        self.steps.push(self.last.elapsed());
        self.last = Instant::now();
        if let Some((s, x0)) = self.predicted.take() {
            if s == step {
                self.observer.prediction(step, &x0);
            }
        }
        self.observer.step(step);
        Ok(x)
    }
}

/// Runs the request's sampler from `noise` over the schedule, timing each step (and blending each
/// with the input outside the mask, when inpainting), and checks the final latents are finite.
pub(super) fn sample(
    model: &mut dyn Velocity,
    r: &Resolved,
    sched: &Schedule,
    noise: Tensor,
    blend: Option<&Blend>,
    dtype: DType,
    observer: &mut dyn Observer,
) -> Result<(Tensor, Vec<Duration>)> {
    let mut timed = Timed {
        inner: model,
        blend,
        sigmas: &sched.sigmas,
        device: noise.device().clone(),
        last: Instant::now(),
        steps: Vec::with_capacity(sched.timesteps.len()),
        observer,
        predicted: None,
    };
    let latents = r
        .sampler
        .run(&mut timed, noise, &sched.sigmas, &sched.timesteps)?;
    check_finite(&latents, "latents", r.steps_to_run() - 1, dtype)?;
    Ok((latents, timed.steps))
}
