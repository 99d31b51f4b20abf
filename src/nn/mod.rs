//! Layers shared by every model: linear layers, attention, normalisations, the adaptive-norm
//! arithmetic, the rotary embedding's rotation, activations, convolutions and two-layer MLPs. Each
//! wraps candle's op and, where the CPU has a faster kernel for the dtype ([`crate::cpu`], chosen
//! by its feature switch), that kernel instead. `mmdit/`, `vae/` and `text/` build their models from these; none of them takes
//! a layer from another.
//!
//! Naming follows diffusers (`nn.Linear`, `RMSNorm`, `FeedForward`), so constructors mirror the
//! checkpoint keys they read.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod modulate;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod source;

pub use activation::gelu_tanh;
pub use attention::{
    join_heads, join_heads_with, merge_heads, merge_heads_with, sdpa, sdpa_unprofiled, split_heads,
    split_tokens,
};
pub use conv::{Conv2d, ImageLayout};
pub use linear::{linear, linear_no_bias, linear_with, Linear};
pub use mlp::{Activation, FeedForward, Mlp, SwiGlu};
pub use norm::{layer_norm, GroupNorm, RmsNorm};
pub use rope::rotate_pairs;

#[cfg(test)]
pub(crate) mod test_util {
    pub(crate) use crate::cpu::normal_tensor as normal;
    use candle_core::Tensor;

    /// Every value widened to f32, flattened.
    pub fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Every value's f32 bits (after widening to f32), for comparisons bit for bit.
    pub fn bits(t: &Tensor) -> Vec<u32> {
        values(t).iter().map(|v| v.to_bits()).collect()
    }

    /// max |a - b| over all elements.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// (max |a - b| / (|b| + 1), share of elements that differ)
    pub fn compare(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let (a, b) = (values(a), values(b));
        let rel = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (y.abs() + 1.0))
            .fold(0f32, f32::max);
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f32 / a.len() as f32;
        (rel, differ)
    }

    /// max |a - b| in f32.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        (f(a) - f(b))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
