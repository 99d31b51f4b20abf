//! What the CUDA backend runs beyond candle's kernels: cuDNN's fused attention ([`sdpa`], with the
//! `cuda` feature; its C++ side is `sdpa.cpp`, built by `build.rs`).

mod key;
#[cfg(feature = "cuda")]
mod sdpa;

#[cfg(feature = "cuda")]
pub use sdpa::sdpa;
