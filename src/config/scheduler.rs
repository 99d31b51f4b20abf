use super::{check, n};
use crate::error::Result;
use std::path::Path;

/// `scheduler/scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "n::<1000>")]
    pub num_train_timesteps: usize,
    #[serde(default = "d1")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "d05")]
    pub base_shift: f64,
    #[serde(default = "d115")]
    pub max_shift: f64,
    #[serde(default = "n::<256>")]
    pub base_image_seq_len: usize,
    #[serde(default = "n::<4096>")]
    pub max_image_seq_len: usize,
    /// Stretches the schedule so the last sigma equals this (SD3.5-large-turbo leaves it null).
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default = "dexp")]
    pub time_shift_type: String,
}

fn d1() -> f64 {
    1.0
}
fn d05() -> f64 {
    0.5
}
fn d115() -> f64 {
    1.15
}
fn dexp() -> String {
    "exponential".into()
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl SchedulerConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        check(
            path,
            (2..=100_000).contains(&self.num_train_timesteps),
            || {
                format!(
                    "`num_train_timesteps` is {}, expected 2..=100000",
                    self.num_train_timesteps
                )
            },
        )?;
        check(path, self.shift.is_finite() && self.shift > 0.0, || {
            format!("`shift` is {}, expected a positive number", self.shift)
        })?;
        for (n, v) in [
            ("base_shift", self.base_shift),
            ("max_shift", self.max_shift),
        ] {
            check(path, v.is_finite(), || format!("`{n}` is not finite"))?;
        }
        check(
            path,
            self.max_image_seq_len != self.base_image_seq_len || !self.use_dynamic_shifting,
            || {
                "`max_image_seq_len` equals `base_image_seq_len`, the dynamic shift is undefined"
                    .into()
            },
        )?;
        if let Some(t) = self.shift_terminal {
            check(path, t.is_finite() && t > 0.0 && t < 1.0, || {
                format!("`shift_terminal` is {t}, expected 0..1")
            })?;
        }
        check(
            path,
            !(self.use_karras_sigmas
                || self.use_exponential_sigmas
                || self.use_beta_sigmas
                || self.invert_sigmas
                || self.stochastic_sampling),
            || {
                "karras/exponential/beta/inverted sigmas and stochastic sampling are not supported"
                    .into()
            },
        )?;
        check(
            path,
            matches!(self.time_shift_type.as_str(), "exponential" | "linear"),
            || {
                format!(
                    "`time_shift_type` {:?} is not supported (exponential, linear)",
                    self.time_shift_type
                )
            },
        )
    }
}
