//! LoRA deltas applied at run time: `y = x Wᵀ + b + Σ scale · (x Aᵀ) Bᵀ`, a term of
//! [`super::Linear::forward`], for weights that are not merged (quantized ones, or a pipeline that
//! switches LoRAs between requests without reloading).
//!
//! Each [`super::linear`] built inside [`collect`] gets a [`Slot`], registered under its
//! checkpoint name (`transformer_blocks.0.attn.to_q`); the pipeline fills the slots it holds.
//! The registry is a thread-local that exists only while `collect` runs, so models keep their
//! constructors' signatures (`new(cfg, vb)`) and layers built outside it carry no slot.

use crate::cpu::sgemm::{self, PackedF32};
use candle_core::{DType, Device, Result, Tensor};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The run-time LoRA term of one layer: every adapter's factors side by side, the scales folded
/// into the up factor, so that the term is two products whatever the number of adapters.
#[derive(Debug, Clone)]
pub struct Delta {
    /// (in, r): the down factors, transposed and concatenated.
    down_t: Tensor,
    /// (r, out): the up factors times their scales, transposed and concatenated.
    up_t: Tensor,
    /// On a CPU with AVX-512: both factors packed for [`crate::cpu::sgemm`], so that a packed layer
    /// adds the term to its f32 accumulators before rounding once.
    packed: Option<(PackedF32, PackedF32)>,
    /// DoRA's per-row affine of the layer's output `(g, c)`, (out,) each in f32 on the layer's
    /// device: the output y (bias and term included) becomes `g · y + c` ([`Delta::rescale`]).
    affine: Option<(Tensor, Tensor)>,
}

impl Delta {
    /// From `(down (r_i, in), up (out, r_i), scale_i)` pieces and DoRA's output affine, in f32 on
    /// the layer's device.
    pub fn new(
        pieces: &[(Tensor, Tensor, f64)],
        affine: Option<(Tensor, Tensor)>,
        device: &Device,
    ) -> Result<Option<Self>> {
        if pieces.is_empty() {
            return Ok(None);
        }
        let mut downs = Vec::with_capacity(pieces.len());
        let mut ups = Vec::with_capacity(pieces.len());
        for (down, up, scale) in pieces {
            downs.push(down.to_dtype(DType::F32)?);
            ups.push((up.to_dtype(DType::F32)? * *scale)?);
        }
        let down = Tensor::cat(&downs, 0)?.contiguous()?; // (r, in)
        let up = Tensor::cat(&ups, 1)?.contiguous()?; // (out, r)
        let packed = if device.is_cpu() && crate::cpu::features().avx512 {
            let (r, k) = down.dims2()?;
            let n = up.dim(0)?;
            let d = crate::cpu::with_slice(&down, |w| PackedF32::from_nk(w, r, k))?;
            let u = crate::cpu::with_slice(&up, |w| PackedF32::from_nk(w, n, r))?;
            Some((d, u))
        } else {
            None
        };
        Ok(Some(Self {
            down_t: down.t()?.contiguous()?.to_device(device)?,
            up_t: up.t()?.contiguous()?.to_device(device)?,
            packed,
            affine: match affine {
                Some((g, c)) => Some((
                    g.to_dtype(DType::F32)?.to_device(device)?,
                    c.to_dtype(DType::F32)?.to_device(device)?,
                )),
                None => None,
            },
        }))
    }

    /// The layer's output `y` (.., out), its term added, through DoRA's affine when there is one
    /// (computed in f32, returned in `y`'s dtype).
    pub fn rescale(&self, y: Tensor) -> Result<Tensor> {
        let Some((g, c)) = &self.affine else {
            return Ok(y);
        };
        let dtype = y.dtype();
        y.to_dtype(DType::F32)?
            .broadcast_mul(g)?
            .broadcast_add(c)?
            .to_dtype(dtype)
    }

    /// Adds the term for the f32 rows `x` (m x in) to `out` (m x out), when the factors are
    /// packed; false (and nothing done) when they are not.
    pub fn add_packed(&self, x: &[f32], m: usize, out: &mut [f32]) -> bool {
        let Some((down, up)) = &self.packed else {
            return false;
        };
        let (k, r, n) = (down.k(), down.n(), up.n());
        let mut u = vec![0f32; m * r];
        sgemm::matmul(x, m, k, down, None, &mut u, r); // (m, r)
        sgemm::matmul_add(&u, m, r, up, out, n); // out += (m, r) · (r, n)
        true
    }

    /// Whether [`Delta::add_packed`] can run.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The term for `x` (.., in) -> (.., out), in `x`'s dtype (computed in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (in_dim, out_dim) = (self.down_t.dim(0)?, self.up_t.dim(1)?);
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / in_dim;
        let x2 = x.to_dtype(DType::F32)?.reshape((m, in_dim))?;
        let y = x2.matmul(&self.down_t)?.matmul(&self.up_t)?; // (m, out)
        *dims.last_mut().expect("rank >= 1") = out_dim;
        y.reshape(dims)?.to_dtype(x.dtype())
    }

    /// (in, out) of the layer it fits.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok((self.down_t.dim(0)?, self.up_t.dim(1)?))
    }
}

/// A layer's run-time LoRA term, replaced between requests.
#[derive(Debug, Default)]
pub struct Slot(RwLock<Option<Arc<Delta>>>);

impl Slot {
    pub fn set(&self, delta: Option<Delta>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = delta.map(Arc::new);
    }

    pub fn get(&self) -> Option<Arc<Delta>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The slots of a model's layers, by checkpoint name (without `.weight`).
pub type Slots = BTreeMap<String, Arc<Slot>>;

thread_local! {
    static REGISTRY: RefCell<Option<Slots>> = const { RefCell::new(None) };
}

/// Runs `build`, giving every [`super::linear`] it makes a slot, and returns them by name.
pub fn collect<T>(build: impl FnOnce() -> T) -> (T, Slots) {
    let outer = REGISTRY.with(|r| r.borrow_mut().replace(Slots::new()));
    let out = build();
    let slots = REGISTRY.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    (out, slots.unwrap_or_default())
}

/// A new slot for the layer `name` when a [`collect`] is running.
pub(super) fn register(name: &str) -> Option<Arc<Slot>> {
    REGISTRY.with(|r| {
        r.borrow_mut().as_mut().map(|slots| {
            slots
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(Slot::default()))
                .clone()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::normal;

    /// Two adapters' term against `scale_1 B_1 A_1 x + scale_2 B_2 A_2 x` computed directly.
    #[test]
    fn delta_sums_scaled_products() {
        let (a1, b1) = (normal((3, 10), 1.0, 1), normal((7, 3), 1.0, 2));
        let (a2, b2) = (normal((2, 10), 1.0, 3), normal((7, 2), 1.0, 4));
        let d = Delta::new(
            &[
                (a1.clone(), b1.clone(), 0.7),
                (a2.clone(), b2.clone(), -0.3),
            ],
            None,
            &Device::Cpu,
        )
        .unwrap()
        .unwrap();
        let x = normal((2, 5, 10), 1.0, 5);
        let got = d.forward(&x).unwrap();
        let w = ((b1.matmul(&a1).unwrap() * 0.7).unwrap()
            + (b2.matmul(&a2).unwrap() * -0.3).unwrap())
        .unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let err = crate::nn::test_util::max_diff(&got, &want);
        assert!(err < 1e-4, "{err}");
        assert_eq!(d.dims().unwrap(), (10, 7));
    }

    #[test]
    fn slots_exist_only_inside_collect() {
        assert!(register("a").is_none());
        let ((), slots) = collect(|| {
            register("a").unwrap();
            register("b").unwrap();
        });
        assert_eq!(slots.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(register("a").is_none());
    }
}
