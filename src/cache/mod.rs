//! Step caching: at steps where the transformer's output barely changes, reuse what earlier steps
//! computed instead of running (most of) the model. Three policies, each with warm-up calls that
//! always compute and never caching the last call:
//!
//! - `fbcache:THRESHOLD` — diffusers' `FirstBlockCache`: run the first block; when its residual
//!   moved less than THRESHOLD (relative mean absolute difference) since the last computed call,
//!   skip the other blocks and add their residual from then.
//! - `teacache:THRESHOLD` — TeaCache: accumulate the (rescaled) relative change of the first
//!   block's modulated input; while the sum stays under THRESHOLD, skip every block and add their
//!   last residual.
//! - `taylorseer:ORDER:INTERVAL` — diffusers' `TaylorSeerCache` in its lite mode: compute every
//!   INTERVAL-th call after the warm-up, predict the model's output in between from a Taylor
//!   series of order ORDER (finite differences of the computed outputs).
//!
//! A [`StepCache`] is one guidance branch's state over a run (the positive and negative calls of
//! two-call guidance cache separately, as diffusers' cache contexts do).

use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use candle_core::{DType, Tensor};
use std::fmt;

/// A step cache as asked for (`--cache`, a request's `cache`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSpec {
    FirstBlock {
        threshold: f64,
        warmup: usize,
    },
    TeaCache {
        threshold: f64,
        warmup: usize,
    },
    TaylorSeer {
        order: usize,
        interval: usize,
        warmup: usize,
    },
}

/// The highest TaylorSeer order accepted.
pub const MAX_ORDER: usize = 4;

const FORMS: &str = "use none, fbcache:THRESHOLD, teacache:THRESHOLD or taylorseer:ORDER:INTERVAL (each with an optional :WARMUP), e.g. fbcache:0.08";

fn bad(spec: &str, why: impl fmt::Display) -> Error {
    Error::invalid(Param::Cache, format!(" {spec}: {why}"))
}

impl CacheSpec {
    /// Parses `none` (`Ok(None)`) or one of the forms in the module's documentation; numbers
    /// left out take diffusers' defaults (threshold 0.05 for fbcache, 0.4 for teacache; order 1,
    /// interval 5 and 3 warm-up calls for taylorseer; 1 warm-up call for the others).
    pub fn parse(spec: &str) -> Result<Option<Self>> {
        let s = spec.trim().to_ascii_lowercase();
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let nums: Vec<&str> = parts.collect();
        let threshold = |at: usize, default: f64| -> Result<f64> {
            let Some(t) = nums.get(at) else {
                return Ok(default);
            };
            match t.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(bad(
                    spec,
                    format!("threshold {t:?} must be a number of at least 0, e.g. {name}:0.08"),
                )),
            }
        };
        let count = |at: usize, what: &str, default: usize| -> Result<usize> {
            let Some(t) = nums.get(at) else {
                return Ok(default);
            };
            t.parse::<usize>()
                .map_err(|_| bad(spec, format!("{what} {t:?} must be a whole number")))
        };
        let most = |n: usize| -> Result<()> {
            match nums.len() > n {
                true => Err(bad(spec, format!("too many numbers for {name}; {FORMS}"))),
                false => Ok(()),
            }
        };
        let c = match name {
            "none" | "off" if nums.is_empty() => return Ok(None),
            "fbcache" => {
                most(2)?;
                CacheSpec::FirstBlock {
                    threshold: threshold(0, 0.05)?,
                    warmup: count(1, "warm-up", 1)?,
                }
            }
            "teacache" => {
                most(2)?;
                CacheSpec::TeaCache {
                    threshold: threshold(0, 0.4)?,
                    warmup: count(1, "warm-up", 1)?,
                }
            }
            "taylorseer" => {
                most(3)?;
                let order = count(0, "order", 1)?;
                if order == 0 || order > MAX_ORDER {
                    return Err(bad(
                        spec,
                        format!("order {order} must be between 1 and {MAX_ORDER}"),
                    ));
                }
                let interval = count(1, "interval", 5)?;
                if interval == 0 {
                    return Err(bad(
                        spec,
                        "interval 0 must be at least 1 (the model computes every INTERVAL-th step)",
                    ));
                }
                CacheSpec::TaylorSeer {
                    order,
                    interval,
                    warmup: count(2, "warm-up", 3)?,
                }
            }
            _ => return Err(bad(spec, format!("unknown cache; {FORMS}"))),
        };
        // TaylorSeer needs `order` computed outputs before its series has that order; a warm-up
        // shorter than that is allowed (diffusers allows it), the series then starts lower.
        Ok(Some(c))
    }

    /// Whether any call of a run of `calls` model calls (per branch) could be cached: the
    /// warm-up and the last call always compute.
    pub fn has_effect(&self, calls: usize) -> bool {
        (0..calls).any(|i| !self.forced(i, calls))
            && match *self {
                CacheSpec::TaylorSeer { .. } => (0..calls).any(|i| !self.taylor_computes(i, calls)),
                _ => true,
            }
    }

    /// Whether call `i` of `calls` must compute whatever the cache's state: a warm-up call or the
    /// last.
    fn forced(&self, i: usize, calls: usize) -> bool {
        let warmup = match *self {
            CacheSpec::FirstBlock { warmup, .. }
            | CacheSpec::TeaCache { warmup, .. }
            | CacheSpec::TaylorSeer { warmup, .. } => warmup,
        };
        i < warmup || i + 1 >= calls
    }

    /// TaylorSeer's schedule (diffusers' `_measure_should_compute` with
    /// `disable_cache_after_step` at the last call): the warm-up, then every `interval`-th call
    /// counted from the one after the warm-up's end, and the last.
    fn taylor_computes(&self, i: usize, calls: usize) -> bool {
        match *self {
            CacheSpec::TaylorSeer {
                interval, warmup, ..
            } => {
                let since = i as i64 - warmup as i64 - 1;
                self.forced(i, calls) || since.rem_euclid(interval as i64) == 0
            }
            _ => true,
        }
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CacheSpec::FirstBlock { threshold, warmup } => {
                write!(f, "fbcache:{threshold}:{warmup}")
            }
            CacheSpec::TeaCache { threshold, warmup } => {
                write!(f, "teacache:{threshold}:{warmup}")
            }
            CacheSpec::TaylorSeer {
                order,
                interval,
                warmup,
            } => write!(f, "taylorseer:{order}:{interval}:{warmup}"),
        }
    }
}

/// A notice for a cache that cannot skip anything in a run of `calls` calls per branch.
pub fn no_effect(spec: &CacheSpec, steps: usize) -> Message {
    Message::about(Param::Cache).text(format!(
        " {spec} has no effect on a {steps}-step run: its warm-up and the last step always run the model; caching needs more steps"
    ))
}

/// What one model call of a branch cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallKind {
    /// Every block ran.
    Full,
    /// The model ran, most blocks did not: the first block (fbcache) or none (teacache).
    Partial,
    /// The model did not run: its output was predicted (taylorseer).
    Predicted,
}

/// How many model calls of a run (all branches) ran in full, partly and not at all.
pub fn summary(calls: &[Vec<CallKind>]) -> String {
    let all: Vec<CallKind> = calls.iter().flatten().copied().collect();
    let count = |k: CallKind| all.iter().filter(|&&x| x == k).count();
    format!(
        "{} of {} model calls computed in full, {} partly, {} predicted",
        count(CallKind::Full),
        all.len(),
        count(CallKind::Partial),
        count(CallKind::Predicted)
    )
}

/// TeaCache's rescaling of the relative change, a polynomial (highest power first, as numpy's
/// `poly1d`); the identity where no fit was published for the model.
pub const IDENTITY_RESCALE: &[f64] = &[1.0, 0.0];

/// One guidance branch's cache over a run.
pub struct StepCache {
    spec: CacheSpec,
    /// Model calls of the run in this branch.
    calls: usize,
    /// Calls so far.
    next: usize,
    rescale: &'static [f64],
    state: State,
    /// What each call cost, in order.
    pub kinds: Vec<CallKind>,
}

struct State {
    /// fbcache: the first block's residual at the last computed call.
    head: Option<Tensor>,
    /// fbcache: the other blocks' residual at the last computed call; teacache: all blocks'.
    tail: Option<Tensor>,
    /// teacache: the previous call's modulated input and the accumulated change.
    modulated: Option<Tensor>,
    accumulated: f64,
    /// taylorseer: the factors (orders 0..) of the last computed output, f32, and its call.
    factors: Vec<Tensor>,
    updated: Option<usize>,
    /// taylorseer: the model's output dtype.
    dtype: DType,
}

impl Default for State {
    fn default() -> Self {
        Self {
            head: None,
            tail: None,
            modulated: None,
            accumulated: 0.0,
            factors: Vec::new(),
            updated: None,
            dtype: DType::F32,
        }
    }
}

/// Mean of |a - b| over mean of |b|, in f32.
fn relative_l1(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let num: f32 = (a - &b)?.abs()?.mean_all()?.to_scalar()?;
    let den: f32 = b.abs()?.mean_all()?.to_scalar()?;
    Ok(f64::from(num) / f64::from(den))
}

fn poly(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

impl StepCache {
    /// A branch's cache for a run of `calls` model calls; `rescale` is TeaCache's polynomial for
    /// the model.
    pub fn new(spec: CacheSpec, calls: usize, rescale: &'static [f64]) -> Self {
        Self {
            spec,
            calls,
            next: 0,
            rescale,
            state: State::default(),
            kinds: Vec::with_capacity(calls),
        }
    }

    /// The branch's next model call: `run` calls the model with a block hook (or none, for a call
    /// that must compute everything); returns the model's output.
    pub fn call(
        &mut self,
        run: &mut dyn FnMut(Option<&mut dyn BlockCache>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let i = self.next;
        self.next += 1;
        let forced = self.spec.forced(i, self.calls);
        let (out, kind) = match self.spec {
            CacheSpec::TaylorSeer { order, .. } => {
                if self.spec.taylor_computes(i, self.calls) || self.state.updated.is_none() {
                    let out = run(None)?;
                    self.taylor_update(i, order, &out)?;
                    (out, CallKind::Full)
                } else {
                    (self.taylor_predict(i)?, CallKind::Predicted)
                }
            }
            CacheSpec::FirstBlock { threshold, .. } | CacheSpec::TeaCache { threshold, .. } => {
                let tea = matches!(self.spec, CacheSpec::TeaCache { .. });
                let mut hook = Hook {
                    state: &mut self.state,
                    threshold,
                    forced,
                    tea,
                    rescale: self.rescale,
                    skipped: false,
                };
                let out = run(Some(&mut hook))?;
                let kind = match hook.skipped {
                    true => CallKind::Partial,
                    false => CallKind::Full,
                };
                (out, kind)
            }
        };
        self.kinds.push(kind);
        Ok(out)
    }

    /// diffusers' `TaylorSeerState.update`: order 0 is the output, each higher order the divided
    /// difference of the one below against the last update's.
    fn taylor_update(&mut self, i: usize, order: usize, out: &Tensor) -> Result<()> {
        let s = &mut self.state;
        let mut new = vec![out.to_dtype(DType::F32)?];
        if let Some(last) = s.updated {
            let delta = (i - last) as f64;
            for j in 0..order {
                let Some(prev) = s.factors.get(j) else { break };
                let next = ((&new[j] - prev)? / delta)?;
                new.push(next);
            }
        }
        s.factors = new;
        s.updated = Some(i);
        s.dtype = out.dtype();
        Ok(())
    }

    /// diffusers' `TaylorSeerState.predict`: `Σ_k factor_k · offset^k / k!`.
    fn taylor_predict(&self, i: usize) -> Result<Tensor> {
        let s = &self.state;
        let offset = (i - s.updated.unwrap_or(i)) as f64;
        let mut out = s.factors[0].clone();
        let mut coeff = 1.0;
        for (k, f) in s.factors.iter().enumerate().skip(1) {
            coeff *= offset / k as f64;
            out = (out + (f * coeff)?)?;
        }
        Ok(out.to_dtype(s.dtype)?)
    }
}

/// fbcache's and teacache's hook inside one model call.
struct Hook<'a> {
    state: &'a mut State,
    threshold: f64,
    forced: bool,
    tea: bool,
    rescale: &'static [f64],
    skipped: bool,
}

impl BlockCache for Hook<'_> {
    fn wants_modulated(&self) -> bool {
        self.tea
    }

    /// TeaCache4FLUX's decision: the first and last calls compute and reset the sum; otherwise the
    /// rescaled relative change since the previous call is added, and the blocks are skipped while
    /// the sum stays under the threshold. The modulated input is kept at every call.
    fn before_blocks(
        &mut self,
        img0: &Tensor,
        modulated: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (true, Some(m)) = (self.tea, modulated) else {
            return Ok(None);
        };
        let s = &mut *self.state;
        let compute = match (&s.modulated, &s.tail) {
            (Some(prev), Some(_)) if !self.forced => {
                s.accumulated += poly(self.rescale, relative_l1(m, prev)?);
                s.accumulated >= self.threshold
            }
            _ => true,
        };
        s.modulated = Some(m.clone());
        if compute {
            s.accumulated = 0.0;
            return Ok(None);
        }
        self.skipped = true;
        let tail = s.tail.as_ref().expect("checked above");
        Ok(Some((img0 + tail)?))
    }

    /// diffusers' `FBCHeadBlockHook`: skip when the first block's residual moved at most the
    /// threshold (relative to the last computed call's residual), which is kept only when the
    /// rest computes.
    fn after_first(&mut self, img0: &Tensor, img1: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.tea {
            return Ok(None);
        }
        let s = &mut *self.state;
        let residual = (img1 - img0)?;
        let skip = match (&s.head, &s.tail) {
            (Some(prev), Some(tail)) if !self.forced => {
                match relative_l1(&residual, prev)? > self.threshold {
                    true => None,
                    false => Some(tail),
                }
            }
            _ => None,
        };
        if let Some(tail) = skip {
            self.skipped = true;
            return Ok(Some((img1 + tail)?));
        }
        s.head = Some(residual);
        Ok(None)
    }

    fn after_all(&mut self, img0: &Tensor, img1: &Tensor, out: &Tensor) -> candle_core::Result<()> {
        self.state.tail = Some(match self.tea {
            true => (out - img0)?,
            false => (out - img1)?,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_and_names_bad_ones() {
        assert_eq!(CacheSpec::parse("none").unwrap(), None);
        assert_eq!(
            CacheSpec::parse("fbcache:0.08").unwrap(),
            Some(CacheSpec::FirstBlock {
                threshold: 0.08,
                warmup: 1
            })
        );
        assert_eq!(
            CacheSpec::parse("TaylorSeer:2:4").unwrap(),
            Some(CacheSpec::TaylorSeer {
                order: 2,
                interval: 4,
                warmup: 3
            })
        );
        assert_eq!(
            CacheSpec::parse("teacache:0.3:2").unwrap(),
            Some(CacheSpec::TeaCache {
                threshold: 0.3,
                warmup: 2
            })
        );
        for (s, says) in [
            ("deepcache:0.1", "unknown cache"),
            ("fbcache:nan", "must be a number of at least 0"),
            ("fbcache:-0.1", "must be a number of at least 0"),
            ("teacache:inf", "must be a number of at least 0"),
            ("taylorseer:0:5", "order 0 must be between 1 and 4"),
            ("taylorseer:5:5", "order 5 must be between 1 and 4"),
            ("taylorseer:1:0", "interval 0"),
            ("fbcache:0.1:2:3", "too many numbers"),
            ("fbcache:0.1:x", "warm-up \"x\""),
        ] {
            let e = CacheSpec::parse(s).unwrap_err().to_string();
            assert!(e.contains(says), "{s}: {e}");
            assert!(e.starts_with("cache"), "{s}: {e}");
        }
        let c = CacheSpec::parse("taylorseer").unwrap().unwrap();
        assert_eq!(CacheSpec::parse(&c.to_string()).unwrap(), Some(c));
    }

    #[test]
    fn warm_up_and_last_call_always_compute() {
        let fb = CacheSpec::parse("fbcache:0.1").unwrap().unwrap();
        assert!(!fb.has_effect(1));
        assert!(!fb.has_effect(2));
        assert!(fb.has_effect(3));
        // diffusers' schedule: warm-up 0..3, then calls 4, 9, ...; the last always.
        let ts = CacheSpec::parse("taylorseer:1:5").unwrap().unwrap();
        let computes: Vec<usize> = (0..12).filter(|&i| ts.taylor_computes(i, 12)).collect();
        assert_eq!(computes, [0, 1, 2, 4, 9, 11]);
        assert!(!CacheSpec::parse("taylorseer:1:1")
            .unwrap()
            .unwrap()
            .has_effect(10));
    }

    #[test]
    fn taylor_series_extrapolates_as_diffusers() {
        // Outputs 1 + 2i + i^2 at calls 0, 1, 2, then order 2 predicts call 3.
        let spec = CacheSpec::TaylorSeer {
            order: 2,
            interval: 100,
            warmup: 3,
        };
        let dev = candle_core::Device::Cpu;
        let mut c = StepCache::new(spec, 10, IDENTITY_RESCALE);
        let mut outs = Vec::new();
        for _ in 0..4 {
            let i = c.next as f32;
            let v = 1.0 + 2.0 * i + i * i;
            let out = c.call(&mut |_| Ok(Tensor::new(&[v], &dev)?)).unwrap();
            outs.push(out.to_vec1::<f32>().unwrap()[0]);
        }
        // Backward differences at call 2 are 5 and 2; diffusers' series (offset^k / k!) gives
        // 9 + 5 + 2 / 2 = 15, one short of the true 16 (Newton's backward form would add 2).
        assert_eq!(outs[..3], [1.0, 4.0, 9.0]);
        assert_eq!(outs[3], 15.0);
        assert_eq!(c.kinds[3], CallKind::Predicted);
    }
}
