//! mmdit: an inference engine for flow-matching MMDiT text-to-image models (SD3 / SD3.5, FLUX.1).
//!
//! ```no_run
//! use mmdit::{ModelRef, Request, Spec};
//! # fn main() -> mmdit::Result<()> {
//! let spec = Spec::open(&ModelRef::parse("models/demo", None)?)?;
//! let mut pipe = spec.load(&candle_core::Device::Cpu, candle_core::DType::F32)?;
//! let req = Request { prompt: "a red circle on a white background".into(), seed: Some(1), ..Default::default() };
//! let out = pipe.generate(&req, &mut |_step| {})?;
//! mmdit::output::write_png("out.png".as_ref(), &out.image, &[])?;
//! # Ok(()) }
//! ```
//!
//! The layers, from the bottom: [`cpu`] (kernels on slices) -> [`nn`] (layers) -> [`mmdit`],
//! [`vae`], [`text`] (models) -> [`pipeline`] (one generic pipeline, a file per family) ->
//! [`presets`]; beside them [`config`], [`loader`], [`sampling`], [`output`]. `docs/architecture.md`
//! draws them.

pub mod bench;
pub mod cache;
pub mod config;
pub mod cpu;
mod cuda;
pub mod device;
pub mod error;
pub mod image_io;
pub mod interrupt;
pub mod loader;
pub mod lora;
pub mod mmdit;
pub mod nn;
pub mod output;
pub mod pipeline;
pub mod presets;
pub mod profile;
pub mod request;
pub mod sampling;
pub mod text;
pub mod vae;

pub use error::{Error, Message, Param, Result};
pub use loader::ModelRef;
pub use output::RgbImage;
pub use pipeline::{Generated, Pipeline, Spec};
pub use request::{Request, Resolved};
