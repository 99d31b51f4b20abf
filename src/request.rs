//! What the user asks for, and its checked, fully resolved form.

use crate::cache::CacheSpec;
use crate::error::{Error, Message, Param, Result};
use crate::output::RgbImage;
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
    /// Step caching (none by default).
    pub cache: Option<CacheSpec>,
    /// Editing (img2img): the image to start from, resized to the output size as diffusers' image
    /// processor does. The output size defaults to the image's, rounded down to the model's multiple.
    pub image: Option<RgbImage>,
    /// With `image`: the share of the schedule that runs, in (0, 1]; 1 repaints everything, small
    /// values keep the image (default 0.6, as diffusers).
    pub strength: Option<f64>,
    /// Further reference images after `image`, for models that take several (FLUX.2); each keeps
    /// its own size.
    pub reference_images: Vec<RgbImage>,
    /// With `image`: inpainting. White repaints, black keeps the input; any size (it is resized to
    /// the output size, as diffusers does).
    pub mask: Option<RgbImage>,
    /// With `image`: the VAE latent distribution's sampling noise (1, C, H/f, W/f) of each encoding,
    /// in diffusers' order (the input image's, then for FLUX.1 Fill the masked image's), replacing
    /// the seeded draws (to reproduce another engine's run).
    pub encode_noise: Vec<Tensor>,
    /// FLUX.1 Kontext: resize the reference image to the training resolution nearest its aspect
    /// ratio (default true, as diffusers' `_auto_resize`); `false` keeps its size, rounded down.
    pub reference_auto_resize: Option<bool>,
    /// LoRAs with their weights, combined as diffusers' `set_adapters` combines them. A pipeline
    /// loaded with other LoRAs switches to these at run time.
    pub loras: Vec<crate::lora::LoraSpec>,
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
    pub cache: Option<CacheSpec>,
    /// Editing: the image to start from, at the output size.
    pub init: Option<Init>,
    /// What the request said itself (a family's defaults and notices depend on it).
    pub given: Given,
    /// Things the user should know about how the request was read (e.g. an ignored option).
    pub notices: Vec<Message>,
}

/// The image an edit starts from and how far into the schedule it starts.
#[derive(Debug, Clone)]
pub struct Init {
    /// The input image at the output size.
    pub image: RgbImage,
    pub strength: f64,
    /// Index of the first schedule step that runs (diffusers' `t_start`).
    pub start: usize,
    /// The latent distributions' sampling noise, each checked against the latent shape; missing
    /// ones are seeded.
    pub encode_noise: Vec<Tensor>,
    /// Inpainting: 1 where the model repaints, 0 where the input is kept, at the output size
    /// (row-major, `width * height`).
    pub mask: Option<Vec<u8>>,
    /// FLUX.2: the further reference images after `image`, each cropped to the model's multiple.
    pub references: Vec<RgbImage>,
}

impl Resolved {
    /// Classifier-free guidance on the guidance scale runs when it is above 1, as diffusers decides.
    pub fn uses_cfg(&self) -> bool {
        self.guidance > 1.0
    }

    /// What a PNG records of how it was made (read back by `generate --from`): this request,
    /// the model as it was named and the dtype.
    pub fn parameters(&self, model: &str, dtype: &str) -> Vec<(String, String)> {
        [
            ("prompt", self.prompt.clone()),
            ("negative_prompt", self.negative_prompt.clone()),
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("sampler", self.sampler.name().to_string()),
            (
                "cache",
                self.cache.map_or_else(|| "none".into(), |c| c.to_string()),
            ),
            ("guidance", self.guidance.to_string()),
            ("true_cfg", self.true_cfg.to_string()),
            ("width", self.width.to_string()),
            ("height", self.height.to_string()),
            ("max_sequence_length", self.max_sequence_length.to_string()),
            ("model", model.to_string()),
            ("dtype", dtype.to_string()),
            ("mmdit_version", env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// How many of the schedule's steps run: all of them, or those after an edit's start.
    pub fn steps_to_run(&self) -> usize {
        self.steps - self.init.as_ref().map_or(0, |i| i.start)
    }
}

/// diffusers' `get_timesteps`: of `steps` steps, an edit at `strength` skips the first
/// `int(max(steps - min(steps * strength, steps), 0))`.
pub fn edit_start(steps: usize, strength: f64) -> usize {
    let n = steps as f64;
    let init = (n * strength).min(n);
    (n - init).max(0.0) as usize
}

/// Checks an edit's strength against the step count: in (0, 1] and leaving at least one step.
pub fn check_strength(strength: f64, steps: usize) -> Result<usize> {
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(Error::invalid(
            Param::Strength,
            format!(
                " {}: must be in (0, 1]: 1 repaints the whole image, small values keep it",
                shown(strength)
            ),
        ));
    }
    let start = edit_start(steps, strength);
    if start >= steps {
        // Rounded up, so that the suggestion itself leaves a step.
        let least = (1000.0 / steps as f64).ceil() / 1000.0;
        return Err(Error::InvalidRequest(
            Message::about(Param::Strength)
                .text(format!(
                    " {strength}: with {steps} steps it leaves no step to run ({steps} x {strength} < 1); use "
                ))
                .param(Param::Strength)
                .text(format!(" {least} or more, or more "))
                .param(Param::Steps),
        ));
    }
    Ok(start)
}

/// Largest image the engine accepts, in pixels (a 4096 x 4096 image).
pub const MAX_PIXELS: usize = 4096 * 4096;

/// Longest prompt (or negative prompt) accepted, in bytes: far beyond the 512 tokens the text
/// encoders read, short of what would make tokenizing a request slow.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;
pub const MAX_STEPS: usize = 1000;
/// Most input images of one request (FLUX.2 takes up to 10 references).
pub const MAX_IMAGES: usize = 10;

/// Checks a side length: non-zero, a multiple of `multiple`, at most `max`. The size limit is
/// checked first, so that a suggested multiple is never above it.
pub fn check_side(p: Param, v: usize, multiple: usize, max: usize) -> Result<()> {
    if v > max {
        return Err(Error::invalid(
            p,
            format!(" {v}: larger than this model supports ({max}); use at most {max}"),
        ));
    }
    if v == 0 || !v.is_multiple_of(multiple) {
        let lo = (v / multiple).max(1) * multiple;
        let hi = lo + multiple;
        let hint = if v == 0 || lo == v {
            format!("{multiple}")
        } else if hi > max {
            format!("{lo}")
        } else {
            format!("{lo} or {hi}")
        };
        return Err(Error::invalid(
            p,
            format!(" {v}: must be a positive multiple of {multiple} for this model; try {hint}"),
        ));
    }
    Ok(())
}

/// A number as an error message shows it: as written for everyday sizes, in exponent form beyond
/// (`1e308`, not its 309 digits).
pub fn shown(x: f64) -> String {
    if x.is_finite() && x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
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
            format!(
                " {}: must be a number between 0 and 100 (1 turns guidance off)",
                shown(g)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side_error(v: usize) -> String {
        check_side(Param::Width, v, 16, 256)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn side_suggestions_stay_within_the_limit() {
        assert!(check_side(Param::Width, 256, 16, 256).is_ok());
        assert!(
            side_error(100).contains("try 96 or 112"),
            "{}",
            side_error(100)
        );
        assert!(
            side_error(250).ends_with("try 240 or 256"),
            "{}",
            side_error(250)
        );
        let e = check_side(Param::Width, 245, 16, 250)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("try 240"), "{e}");
        assert!(side_error(0).ends_with("try 16"), "{}", side_error(0));
        // Too large and not a multiple: the limit is what to fix, not the multiple.
        assert!(side_error(9_999_999_999).contains("use at most 256"));
        assert!(side_error(usize::MAX).contains("use at most 256"));
    }

    #[test]
    fn numbers_in_messages_stay_short() {
        assert_eq!(shown(7.5), "7.5");
        assert_eq!(shown(-5.0), "-5");
        assert_eq!(shown(1e308), "1e308");
        assert_eq!(shown(f64::NAN), "NaN");
        let e = check_guidance(Param::Guidance, 1e308)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 120, "{e}");
    }
}
