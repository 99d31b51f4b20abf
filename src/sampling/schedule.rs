//! Sigma schedules of diffusers' `FlowMatchEulerDiscreteScheduler` (diffusers 0.42.1,
//! `schedulers/scheduling_flow_match_euler_discrete.py`), as pure functions.

use crate::config::SchedulerConfig;

/// The sigmas a sampler walks: `sigmas[0]` (noise) down to a final 0, and the timestep the model
/// is given at each step (`sigma * num_train_timesteps`, rounded to f32 as diffusers does).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// N + 1 values, the last one 0.
    pub sigmas: Vec<f32>,
    /// N values.
    pub timesteps: Vec<f32>,
}

/// Static shift: `s * sigma / (1 + (s - 1) * sigma)`.
pub fn shift_static(sigma: f64, s: f64) -> f64 {
    s * sigma / (1.0 + (s - 1.0) * sigma)
}

/// Resolution-dependent shift of the given type: exponential `e^mu / (e^mu + (1/sigma - 1))`,
/// linear `mu / (mu + (1/sigma - 1))`.
pub fn shift_dynamic(sigma: f64, mu: f64, linear: bool) -> f64 {
    let a = if linear { mu } else { mu.exp() };
    a / (a + (1.0 / sigma - 1.0))
}

/// `mu` for an image of `seq_len` latent tokens: linear from (base_len, base_shift) to (max_len, max_shift).
pub fn calculate_shift(seq_len: usize, cfg: &SchedulerConfig) -> f64 {
    let m = (cfg.max_shift - cfg.base_shift)
        / (cfg.max_image_seq_len as f64 - cfg.base_image_seq_len as f64);
    let b = cfg.base_shift - m * cfg.base_image_seq_len as f64;
    seq_len as f64 * m + b
}

/// The FLUX.1, Chroma and FLUX.2 pipelines' sigmas before shifting: `np.linspace(1, 1/n, n)`.
pub fn linear_sigmas(n: usize) -> Vec<f64> {
    linspace(1.0, 1.0 / n as f64, n)
}

/// `linspace(start, end, n)` as numpy computes it.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = end;
            v
        }
    }
}

impl Schedule {
    /// `set_timesteps(n, mu)` without custom sigmas (the SD3 pipeline). `mu` is required when the
    /// config uses dynamic shifting and ignored otherwise.
    pub fn flow_match(cfg: &SchedulerConfig, n: usize, mu: Option<f64>) -> Self {
        let nt = cfg.num_train_timesteps as f64;
        // The training table, in f32 as at scheduler init; shifted unless dynamic.
        let train = |i: usize| -> f64 {
            let t = ((nt - i as f64) as f32 / nt as f32) as f64; // i = 0 -> 1.0
            if cfg.use_dynamic_shifting {
                t
            } else {
                shift_static(t, cfg.shift) as f32 as f64
            }
        };
        let (sigma_max, sigma_min) = (train(0), train(cfg.num_train_timesteps - 1));
        let base: Vec<f64> = linspace(sigma_max * nt, sigma_min * nt, n)
            .into_iter()
            .map(|t| t / nt)
            .collect();
        Self::from_base(cfg, base, mu)
    }

    /// `set_timesteps(sigmas=custom, mu)`: the pipeline supplies the unshifted sigmas (Flux).
    pub fn flow_match_custom(cfg: &SchedulerConfig, sigmas: &[f64], mu: Option<f64>) -> Self {
        let base = sigmas.iter().map(|&s| s as f32 as f64).collect();
        Self::from_base(cfg, base, mu)
    }

    fn from_base(cfg: &SchedulerConfig, base: Vec<f64>, mu: Option<f64>) -> Self {
        let linear = cfg.time_shift_type == "linear";
        let mut s: Vec<f64> = base
            .into_iter()
            .map(|s| match (cfg.use_dynamic_shifting, mu) {
                (true, Some(mu)) => shift_dynamic(s, mu, linear),
                _ => shift_static(s, cfg.shift),
            })
            .collect();
        // A schedule that already ends at sigma 1 (one step) cannot be stretched; diffusers yields NaN.
        if let (Some(term), Some(&last)) = (cfg.shift_terminal, s.last().filter(|&&l| l < 1.0)) {
            let scale = (1.0 - last) / (1.0 - term);
            for x in &mut s {
                *x = 1.0 - (1.0 - *x) / scale;
            }
        }
        let mut sigmas: Vec<f32> = s.into_iter().map(|x| x as f32).collect();
        let nt = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&x| x * nt).collect();
        sigmas.push(0.0);
        Self { sigmas, timesteps }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd3() -> SchedulerConfig {
        serde_json::from_str(r#"{"shift": 3.0}"#).unwrap()
    }

    #[test]
    fn sd3_schedule_starts_at_one_and_ends_at_zero() {
        let s = Schedule::flow_match(&sd3(), 28, None);
        assert_eq!(s.sigmas.len(), 29);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(s.timesteps[0], 1000.0);
    }

    #[test]
    fn static_shift_of_one_is_identity_and_shift_moves_mass_to_noise() {
        assert_eq!(shift_static(0.3, 1.0), 0.3);
        assert!(shift_static(0.3, 3.0) > 0.3);
        // e^mu / (e^mu + 1/s - 1) with mu = ln 3 equals the static shift 3
        assert!((shift_dynamic(0.3, 3f64.ln(), false) - shift_static(0.3, 3.0)).abs() < 1e-12);
    }

    #[test]
    fn calculate_shift_hits_its_end_points() {
        let c = SchedulerConfig::default();
        assert!((calculate_shift(256, &c) - 0.5).abs() < 1e-12);
        assert!((calculate_shift(4096, &c) - 1.15).abs() < 1e-12);
    }
}
