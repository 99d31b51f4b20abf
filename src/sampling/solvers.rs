//! ODE solvers for the flow `dx/dsigma = v(x, sigma)`, from sigma = 1 (noise) to 0 (data). They know
//! nothing of the model: they call a [`Velocity`] and walk a sigma schedule (stable-diffusion.cpp and
//! k-diffusion keep samplers the same way, as free functions over a denoise callback).

use crate::error::{Error, Param, Result};
use candle_core::{DType, Tensor};

/// The model as the solver sees it.
pub trait Velocity {
    /// Velocity at (x, sigma); `timestep` is what the model is fed (sigma x 1000, f32, exactly the
    /// scheduler's value on schedule points); `step` is the schedule index, for messages.
    /// x and the result are f32.
    fn velocity(&mut self, x: &Tensor, sigma: f32, timestep: f32, step: usize) -> Result<Tensor>;
    /// Called when step `step` is complete with its result `x` (progress bars, timings); returns the
    /// state the next step starts from (inpainting puts back the input outside the mask).
    fn end_step(&mut self, _step: usize, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
}

/// The integrators `--sampler` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// First order, 1 model evaluation per step (diffusers' FlowMatchEulerDiscreteScheduler).
    #[default]
    Euler,
    /// Second order (trapezoidal predictor-corrector), 2 evaluations per step, Euler on the last step
    /// to sigma 0 as k-diffusion does.
    Heun,
    /// Second order (explicit midpoint), 2 evaluations per step.
    Midpoint,
    /// Second-order Adams-Bashforth on the variable sigma grid: reuses the previous velocity,
    /// 1 evaluation per step (Euler on the first).
    Adams2,
}

impl Sampler {
    pub const ALL: [Sampler; 4] = [
        Sampler::Euler,
        Sampler::Heun,
        Sampler::Midpoint,
        Sampler::Adams2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::Heun => "heun",
            Sampler::Midpoint => "midpoint",
            Sampler::Adams2 => "adams2",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::invalid(
                    Param::Sampler,
                    format!(" {s}: unknown sampler; use euler, heun, midpoint or adams2"),
                )
            })
    }

    /// Model evaluations for `steps` steps.
    pub fn nfe(self, steps: usize, sigmas: &[f32]) -> usize {
        match self {
            Sampler::Euler | Sampler::Adams2 => steps,
            Sampler::Midpoint => 2 * steps,
            Sampler::Heun => (0..steps)
                .map(|i| if sigmas[i + 1] == 0.0 { 1 } else { 2 })
                .sum(),
        }
    }

    /// Integrates from `sigmas[0]` to the last sigma. `timesteps[i]` is fed at `sigmas[i]`.
    pub fn run(
        self,
        model: &mut dyn Velocity,
        x: Tensor,
        sigmas: &[f32],
        timesteps: &[f32],
    ) -> Result<Tensor> {
        let mut x = x.to_dtype(DType::F32)?;
        let mut prev: Option<(Tensor, f32)> = None; // (v_{i-1}, h_{i-1}) for Adams2
        let ts = |s: f32| s * 1000.0;
        for (i, &t) in timesteps.iter().enumerate() {
            let (s0, s1) = (sigmas[i], sigmas[i + 1]);
            let h = s1 - s0;
            let v = model.velocity(&x, s0, t, i)?.to_dtype(DType::F32)?;
            x = match self {
                Sampler::Euler => (&x + (&v * h as f64)?)?,
                Sampler::Heun if s1 == 0.0 => (&x + (&v * h as f64)?)?,
                Sampler::Heun => {
                    let xe = (&x + (&v * h as f64)?)?;
                    let v1 = model.velocity(
                        &xe,
                        s1,
                        timesteps.get(i + 1).copied().unwrap_or(ts(s1)),
                        i,
                    )?;
                    (&x + ((&v + v1)? * (h as f64 / 2.0))?)?
                }
                Sampler::Midpoint => {
                    let sm = s0 + h / 2.0;
                    let xm = (&x + (&v * (h as f64 / 2.0))?)?;
                    let vm = model.velocity(&xm, sm, ts(sm), i)?;
                    (&x + (vm * h as f64)?)?
                }
                Sampler::Adams2 => {
                    let next = match &prev {
                        None => (&x + (&v * h as f64)?)?,
                        Some((vp, hp)) => {
                            let r = (h / (2.0 * hp)) as f64;
                            let slope = ((&v * (1.0 + r))? - (vp * r)?)?;
                            (&x + (slope * h as f64)?)?
                        }
                    };
                    prev = Some((v, h));
                    next
                }
            };
            x = model.end_step(i, x)?;
        }
        Ok(x)
    }
}

/// Euler, as diffusers' scheduler steps: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)` in f32.
pub fn euler(
    model: &mut dyn Velocity,
    x: Tensor,
    sigmas: &[f32],
    timesteps: &[f32],
) -> Result<Tensor> {
    Sampler::Euler.run(model, x, sigmas, timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// dx/dsigma = lambda * x, exact solution x(s) = x(1) * exp(lambda * (s - 1)).
    struct Linear {
        lambda: f64,
        evals: usize,
    }
    impl Velocity for Linear {
        fn velocity(&mut self, x: &Tensor, _: f32, _: f32, _: usize) -> Result<Tensor> {
            self.evals += 1;
            Ok((x * self.lambda)?)
        }
    }

    /// Error at sigma = 0.1 of `n` uniform steps from 1, in f64 arithmetic on the host via f32 tensors.
    fn error(s: Sampler, n: usize) -> (f64, usize) {
        let lambda = 1.5;
        let end = 0.1f32;
        let sigmas: Vec<f32> = (0..=n)
            .map(|i| 1.0 - (1.0 - end) * i as f32 / n as f32)
            .collect();
        let ts: Vec<f32> = sigmas[..n].iter().map(|s| s * 1000.0).collect();
        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let mut m = Linear { lambda, evals: 0 };
        let out: Vec<f32> = s.run(&mut m, x, &sigmas, &ts).unwrap().to_vec1().unwrap();
        let exact = (lambda * (end as f64 - 1.0)).exp();
        ((out[0] as f64 - exact).abs(), m.evals)
    }

    #[test]
    fn each_sampler_converges_at_its_order() {
        for (s, order) in [
            (Sampler::Euler, 1.0),
            (Sampler::Heun, 2.0),
            (Sampler::Midpoint, 2.0),
            (Sampler::Adams2, 2.0),
        ] {
            let (e1, _) = error(s, 16);
            let (e2, _) = error(s, 32);
            let observed = (e1 / e2).log2();
            assert!(
                (observed - order).abs() < 0.25,
                "{s:?}: observed order {observed:.2}, expected {order}"
            );
        }
    }

    #[test]
    fn evaluation_counts_match_nfe() {
        for s in Sampler::ALL {
            let (_, evals) = error(s, 8);
            let sigmas: Vec<f32> = (0..=8).map(|i| 1.0 - 0.9 * i as f32 / 8.0).collect();
            assert_eq!(evals, s.nfe(8, &sigmas), "{s:?}");
        }
    }

    #[test]
    fn parse_names_and_rejects_unknown() {
        assert_eq!(Sampler::parse("Heun").unwrap(), Sampler::Heun);
        assert!(Sampler::parse("ddim")
            .unwrap_err()
            .to_string()
            .contains("unknown sampler"));
    }
}
