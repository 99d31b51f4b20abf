//! `mmdit serve`: the model behind OpenAI's images API ([`crate::server`]).

use super::args::{LoraDirArgs, ModelArgs};
use crate::server;
use clap::Args;
use mmdit::device;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 serves the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests that may wait while one runs; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (also from
    /// MMDIT_API_KEY).
    #[arg(long, env = "MMDIT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub lora_dir: LoraDirArgs,
    /// Let pages from this origin (e.g. https://example.com) call the API from a browser (CORS);
    /// off by default.
    #[arg(long, value_name = "ORIGIN")]
    pub cors: Option<String>,
    /// Steps between the previews in a job's progress (0: none). The preview map is fitted to
    /// the model's VAE at load.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub preview_every: usize,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    // Everything given is checked before the model loads.
    if a.queue == 0 {
        return Err(mmdit::Error::request("--queue 0: must be at least 1").into());
    }
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(mmdit::Error::request(
            "--api-key is empty; give a key, or leave it out to serve without one",
        )
        .into());
    }
    let lora_dir = a.lora_dir.checked()?.map(PathBuf::from);
    let cors = match &a.cors {
        None => None,
        Some(o) => {
            let ok = (o.starts_with("http://") || o.starts_with("https://")) && !o.ends_with('/');
            let value = o.parse::<axum::http::HeaderValue>().ok().filter(|_| ok);
            Some(value.ok_or_else(|| {
                mmdit::Error::request(format!(
                    "--cors {o}: give an origin, scheme and host without a path, e.g. https://example.com"
                ))
            })?)
        }
    };
    let chosen = a.model.choose()?;
    let spec = chosen.open()?;
    let load_spec = chosen.open()?;
    let (dev, dtype) = (chosen.device.clone(), chosen.dtype);
    let cfg = server::Config {
        host: a.host,
        port: a.port,
        queue: a.queue,
        api_key: a.api_key.map(|k| k.trim().to_string()),
        lora_dir,
        model: chosen.name.clone(),
        dtype: device::dtype_name(dtype).to_string(),
        preset: chosen.preset.clone(),
        preview_every: a.preview_every,
        cors,
    };
    let load: server::Load = Box::new(move || {
        let loras = mmdit::lora::LoraSet::default();
        load_spec.load_with(&dev, dtype, loras, mmdit::lora::Apply::Runtime)
    });
    server::run(cfg, spec, load)
}
