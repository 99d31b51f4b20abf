//! What the user asks for, and its checked, fully resolved form.

use crate::error::{Error, Message, Param, Result};
use crate::sampling::Sampler;
use candle_core::Tensor;

/// A generation request; `None` fields take the model's defaults.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: String,
    /// Defaults to "" (diffusers' behaviour) when guidance is on.
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Seed of the noise generator; random when absent and no `noise` is given.
    pub seed: Option<u64>,
    /// Initial latents (1, C, H/f, W/f), replacing the seeded noise.
    pub noise: Option<Tensor>,
    /// T5 sequence length.
    pub max_sequence_length: Option<usize>,
    /// Flux: true classifier-free guidance scale, used with a negative prompt.
    pub true_cfg: Option<f64>,
    /// ODE integrator (default Euler, as diffusers).
    pub sampler: Option<Sampler>,
}

/// Which optional values the request set itself; the rest of a [`Resolved`] are defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Given {
    pub negative_prompt: bool,
    pub guidance: bool,
    pub true_cfg: bool,
}

/// A request with every value decided and checked against the model.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// The request's initial latents, checked against the latent shape; `None`: seeded noise.
    pub noise: Option<Tensor>,
    pub max_sequence_length: usize,
    /// Flux true-CFG scale; 1 when off.
    pub true_cfg: f64,
    pub sampler: Sampler,
    /// What the request said itself (a family's defaults and notices depend on it).
    pub given: Given,
    /// Things the user should know about how the request was read (e.g. an ignored option).
    pub notices: Vec<Message>,
}

impl Resolved {
    /// Classifier-free guidance on the guidance scale runs when it is above 1, as diffusers decides.
    pub fn uses_cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// Largest image the engine accepts, in pixels (a 4096 x 4096 image).
pub const MAX_PIXELS: usize = 4096 * 4096;
pub const MAX_STEPS: usize = 1000;

/// Checks a side length: non-zero, a multiple of `multiple`, at most `max`.
pub fn check_side(p: Param, v: usize, multiple: usize, max: usize) -> Result<()> {
    if v == 0 || !v.is_multiple_of(multiple) {
        let lo = (v / multiple).max(1) * multiple;
        let hi = lo + multiple;
        let hint = if v == 0 || lo == v {
            format!("{multiple}")
        } else {
            format!("{lo} or {hi}")
        };
        return Err(Error::invalid(
            p,
            format!(" {v}: must be a positive multiple of {multiple} for this model; try {hint}"),
        ));
    }
    if v > max {
        return Err(Error::invalid(
            p,
            format!(" {v}: larger than this model supports ({max}); use at most {max}"),
        ));
    }
    Ok(())
}

pub fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(Error::invalid(
            Param::Steps,
            format!(" {steps}: must be between 1 and {MAX_STEPS}"),
        ));
    }
    Ok(())
}

pub fn check_guidance(p: Param, g: f64) -> Result<()> {
    if !g.is_finite() || !(0.0..=100.0).contains(&g) {
        return Err(Error::invalid(
            p,
            format!(" {g}: must be a number between 0 and 100 (1 turns guidance off)"),
        ));
    }
    Ok(())
}
