//! ODE solvers for the flow `dx/dsigma = v(x, sigma)`, from sigma = 1 (noise) to 0 (data). They know
//! nothing of the model: they call a [`Velocity`] and walk a [`Schedule`](super::Schedule).

use crate::error::Result;
use candle_core::{DType, Tensor};

/// The model as the solver sees it: a velocity at (x, sigma). `step` is the schedule index the
/// evaluation belongs to, for progress reports and error messages.
pub trait Velocity {
    /// x: latents (f32); returns v with x's shape, in f32.
    fn velocity(&mut self, x: &Tensor, sigma: f32, timestep: f32, step: usize) -> Result<Tensor>;
}

/// Euler: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)`, in f32 as diffusers' scheduler.
pub fn euler(
    model: &mut dyn Velocity,
    x: Tensor,
    sigmas: &[f32],
    timesteps: &[f32],
) -> Result<Tensor> {
    let mut x = x.to_dtype(DType::F32)?;
    for (i, &t) in timesteps.iter().enumerate() {
        let v = model.velocity(&x, sigmas[i], t, i)?.to_dtype(DType::F32)?;
        let dt = sigmas[i + 1] - sigmas[i];
        x = (x + (v * dt as f64)?)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// v = -x / (1 - sigma)... a linear ODE; here the simplest: constant velocity, Euler is exact.
    struct Const(f32);
    impl Velocity for Const {
        fn velocity(&mut self, x: &Tensor, _: f32, _: f32, _: usize) -> Result<Tensor> {
            Ok((x.ones_like()? * self.0 as f64)?)
        }
    }

    #[test]
    fn euler_is_exact_for_constant_velocity() {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let out = euler(&mut Const(2.0), x, &[1.0, 0.5, 0.0], &[1000.0, 500.0]).unwrap();
        let v: Vec<f32> = out.to_vec1().unwrap();
        assert!(v.iter().all(|&a| (a + 2.0).abs() < 1e-6), "{v:?}");
    }
}
