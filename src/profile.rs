//! Where a transformer step's time goes, when `MMDIT_PROFILE=1`: each [`Phase`] of a block
//! (projections, attention core, norms and modulation, feed-forward, copies) is timed with the
//! device synchronised before and after, and the totals are read back by `mmdit bench`. Off by
//! default: then a phase is a plain call, with no synchronisation.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static ENABLED: OnceLock<bool> = OnceLock::new();

/// The parts of a transformer step that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Embeddings,
    QkvProjections,
    QkNorm,
    Rope,
    AttentionCore,
    OutputProjections,
    FeedForward,
    Norms,
    Copies,
    Final,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Embeddings => "embeddings (patches, time, text)",
            Phase::QkvProjections => "q/k/v projections",
            Phase::QkNorm => "q/k RMSNorm",
            Phase::Rope => "RoPE",
            Phase::AttentionCore => "attention core (scores, softmax, values)",
            Phase::OutputProjections => "output projections",
            Phase::FeedForward => "feed-forward",
            Phase::Norms => "norms, modulation, gates, residuals",
            Phase::Copies => "copies (heads, joins, splits)",
            Phase::Final => "final norm and projection",
        }
    }
}

static TOTALS: Mutex<BTreeMap<Phase, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Whether `MMDIT_PROFILE` is set to something other than `0` or empty.
pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var("MMDIT_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Runs `f` as phase `what`, timing it when profiling is on.
pub fn phase<T>(
    what: Phase,
    dev: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if !enabled() {
        return f();
    }
    dev.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let dt = t0.elapsed();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.entry(what).or_insert((Duration::ZERO, 0));
    e.0 += dt;
    e.1 += 1;
    Ok(out)
}

/// Forgets what was measured so far (after a warm-up run).
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// (phase, total time, calls), longest first.
pub fn totals() -> Vec<(Phase, Duration, u64)> {
    let mut v: Vec<_> = TOTALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, (d, n))| (*k, *d, *n))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// A markdown table of the phases per transformer step, over `steps` steps whose wall time was
/// `step_total`; the rest of the step (embeddings, sampler, scheduling) is listed as "other".
pub fn report(steps: usize, step_total: Duration) -> String {
    let steps = steps.max(1) as f64;
    let total = step_total.as_secs_f64() / steps;
    let mut out = String::from("| phase | ms/step | share | calls/step |\n|---|---|---|---|\n");
    let mut sum = 0.0;
    for (what, d, n) in totals() {
        let s = d.as_secs_f64() / steps;
        sum += s;
        out += &format!(
            "| {} | {:.1} | {:.0}% | {:.0} |\n",
            what.name(),
            s * 1e3,
            100.0 * s / total.max(1e-12),
            n as f64 / steps
        );
    }
    let other = (total - sum).max(0.0);
    out += &format!(
        "| other (embeddings, sampler, launch gaps) | {:.1} | {:.0}% | |\n| **step** | {:.1} | 100% | |\n",
        other * 1e3,
        100.0 * other / total.max(1e-12),
        total * 1e3
    );
    out
}
