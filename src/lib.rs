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

pub mod config;
pub mod cpu;
pub mod device;
pub mod error;
pub mod interrupt;
pub mod loader;
pub mod mmdit;
pub mod output;
pub mod pipeline;
pub mod presets;
pub mod profile;
pub mod request;
pub mod sampling;
pub mod text;
pub mod vae;

pub use error::{Error, Result};
pub use loader::ModelRef;
pub use pipeline::{
    FluxPipeline, FluxSpec, Generated, Pipeline, RgbImage, Sd3Pipeline, Sd3Spec, Spec,
};
pub use request::{Request, Resolved};
pub mod bench;
