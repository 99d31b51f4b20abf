//! Model presets: data files in `models/` (embedded at build time) naming a Hub repo or a local folder
//! and the defaults a user of that model expects.

use crate::error::{Error, Message, Param, Result};
use crate::loader::single::{Detected, Fingerprint, SingleFile};
use crate::loader::ModelRef;
use crate::request::Request;
use std::path::PathBuf;

/// The preset files, embedded so the binary knows them from any working directory.
const FILES: [(&str, &str); 14] = [
    ("demo", include_str!("../models/demo.toml")),
    ("sd3-medium", include_str!("../models/sd3-medium.toml")),
    ("sd3.5-large", include_str!("../models/sd3.5-large.toml")),
    (
        "sd3.5-large-turbo",
        include_str!("../models/sd3.5-large-turbo.toml"),
    ),
    ("sd3.5-medium", include_str!("../models/sd3.5-medium.toml")),
    (
        "flux.1-schnell",
        include_str!("../models/flux.1-schnell.toml"),
    ),
    ("flux.1-dev", include_str!("../models/flux.1-dev.toml")),
    (
        "flux.1-fill-dev",
        include_str!("../models/flux.1-fill-dev.toml"),
    ),
    (
        "flux.1-kontext-dev",
        include_str!("../models/flux.1-kontext-dev.toml"),
    ),
    ("chroma1-hd", include_str!("../models/chroma1-hd.toml")),
    ("chroma1-base", include_str!("../models/chroma1-base.toml")),
    (
        "flux.2-klein-4b",
        include_str!("../models/flux.2-klein-4b.toml"),
    ),
    (
        "flux.2-klein-9b",
        include_str!("../models/flux.2-klein-9b.toml"),
    ),
    ("flux.2-dev", include_str!("../models/flux.2-dev.toml")),
];

/// Defaults a preset sets; each applies only when the user gives no value.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// The scheduler's static shift (as in the model's scheduler_config.json).
    pub shift: Option<f64>,
    pub max_sequence_length: Option<usize>,
    pub dtype_cpu: Option<String>,
    pub dtype_cuda: Option<String>,
    pub dtype_metal: Option<String>,
}

/// One `models/*.toml` file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub description: String,
    /// `sd3` or `flux`.
    pub family: String,
    /// Hub repo id; absent for local presets.
    pub repo: Option<String>,
    pub revision: Option<String>,
    /// Folder under `models/` for local presets.
    pub path: Option<String>,
    /// `diffusers` (multi-folder).
    pub layout: String,
    /// Where the text encoders come from: `repo` (the repo's own subfolders).
    pub text_encoders: String,
    pub gated: bool,
    pub licence: String,
    /// Weight download size in GB (from the shape manifests).
    pub download_gb: Option<f64>,
    #[serde(default)]
    pub defaults: Defaults,
    /// The shapes of this model's original single-file checkpoint, by which such a file is recognised
    /// as this model (absent where another preset has the same shapes).
    pub single_file: Option<Fingerprint>,
}

impl Preset {
    /// Parses and checks a preset file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let p: Preset =
            toml::from_str(text).map_err(|e| Error::request(format!("invalid preset: {e}")))?;
        let bad = |m: &str| Err(Error::request(format!("invalid preset `{}`: {m}", p.name)));
        if p.repo.is_some() == p.path.is_some() {
            return bad("set exactly one of `repo` and `path`");
        }
        if crate::pipeline::family::by_name(&p.family).is_none() {
            let names: Vec<&str> = crate::pipeline::family::FAMILIES
                .iter()
                .map(|f| f.name)
                .collect();
            return bad(&format!("`family` must be one of {}", names.join(", ")));
        }
        if p.layout != "diffusers" {
            return bad("`layout` must be diffusers");
        }
        if let Some(s) = p.defaults.steps {
            crate::request::check_steps(s)?;
        }
        if let Some(g) = p.defaults.guidance {
            crate::request::check_guidance(Param::Guidance, g)?;
        }
        if p.defaults
            .shift
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return bad("`shift` must be a positive number");
        }
        for d in [
            &p.defaults.dtype_cpu,
            &p.defaults.dtype_cuda,
            &p.defaults.dtype_metal,
        ]
        .into_iter()
        .flatten()
        {
            crate::device::parse_dtype(d)?;
        }
        Ok(p)
    }

    /// Every embedded preset.
    pub fn all() -> Vec<Preset> {
        FILES
            .iter()
            .map(|(_, t)| Preset::parse(t).expect("embedded presets are valid (tested)"))
            .collect()
    }

    /// The preset with this name, if any.
    pub fn find(name: &str) -> Option<Preset> {
        FILES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| Preset::parse(t).expect("embedded presets are valid"))
    }

    /// Where the preset's files are (local presets: under [`models_dir`]).
    pub fn model_ref(&self, revision: Option<&str>) -> ModelRef {
        match (&self.repo, &self.path) {
            (Some(repo), _) => ModelRef::Hub {
                repo: repo.clone(),
                revision: revision
                    .or(self.revision.as_deref())
                    .unwrap_or("main")
                    .to_string(),
            },
            (None, Some(p)) => ModelRef::Folder(models_dir().join(p)),
            (None, None) => unreachable!("checked in parse"),
        }
    }

    /// The preset whose single-file checkpoint has these shapes, if any.
    pub fn for_single_file(d: &Detected) -> Option<Preset> {
        Preset::all().into_iter().find(|p| {
            p.single_file == Some(d.fingerprint)
                && crate::pipeline::family::by_name(&p.family)
                    .is_some_and(|f| f.single_file == d.format)
        })
    }

    /// Fills the request's unset fields from the preset's defaults.
    pub fn apply(&self, req: &mut Request) {
        let d = &self.defaults;
        req.steps = req.steps.or(d.steps);
        req.guidance = req.guidance.or(d.guidance);
        req.max_sequence_length = req.max_sequence_length.or(d.max_sequence_length);
    }

    /// The preset's dtype for a device, if it sets one.
    pub fn dtype_for(&self, device: &candle_core::Device) -> Option<&str> {
        let d = &self.defaults;
        if device.is_cuda() {
            d.dtype_cuda.as_deref()
        } else if device.is_metal() {
            d.dtype_metal.as_deref()
        } else {
            d.dtype_cpu.as_deref()
        }
    }
}

/// Resolves `--model` and `--components`: a single-file checkpoint takes its configs, tokenizers and
/// missing components from `components` (a preset, folder or repo), else from the preset of the
/// variant its shapes show; its defaults are that preset's.
pub fn resolve_with(
    model: &str,
    revision: Option<&str>,
    components: Option<&str>,
) -> Result<(ModelRef, Option<Preset>)> {
    let (m, preset) = resolve(model, revision)?;
    let ModelRef::SingleFile { file, .. } = m else {
        if components.is_some() {
            return Err(Error::invalid(
                Param::Components,
                " applies to single-file .safetensors checkpoints only",
            ));
        }
        return Ok((m, preset));
    };
    let (comps, preset) = match components {
        Some(c) => resolve(c, None)?,
        None => {
            let single = SingleFile::open(&file)?;
            let preset = default_preset(&single)?;
            (preset.model_ref(None), Some(preset))
        }
    };
    Ok((
        ModelRef::SingleFile {
            file,
            components: Some(Box::new(comps)),
        },
        preset,
    ))
}

/// Resolves what the user typed for `--model`: a preset name, a folder, or a Hub repo id.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<(ModelRef, Option<Preset>)> {
    if let Some(p) = Preset::find(model) {
        return Ok((p.model_ref(revision), Some(p)));
    }
    ModelRef::parse(model, revision)
        .map(|m| (m, None))
        .map_err(|e| match e {
            Error::InvalidRequest(m) => Error::InvalidRequest(m.text(format!(
                "; or a preset: {}",
                FILES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
            e => e,
        })
}

/// The preset that completes a single-file checkpoint whose shapes are those of a released model.
pub fn default_preset(single: &SingleFile) -> Result<Preset> {
    Preset::for_single_file(&single.detected).ok_or_else(|| {
        Error::InvalidRequest(
            Message::from(format!(
                "{}: a {} single-file checkpoint whose shapes match no released model; pass ",
                single.path.display(),
                single.detected.format.name()
            ))
            .param(Param::Components)
            .text(" with a preset, folder or Hub repo that holds its configs and tokenizers"),
        )
    })
}

/// The folder of the local presets' files: `MMDIT_MODELS_DIR` when set (a binary moved away from its
/// checkout), else the checkout's `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("MMDIT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_preset_parses_and_names_match_files() {
        for (file, text) in FILES {
            let p = Preset::parse(text).unwrap();
            assert_eq!(p.name, file);
        }
        // Every preset file in models/ is embedded.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let on_disk = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "toml"))
            })
            .count();
        assert_eq!(Preset::all().len(), on_disk);
    }

    #[test]
    fn invalid_presets_are_refused() {
        assert!(Preset::parse("name = 1").is_err());
        let ok = include_str!("../models/sd3-medium.toml");
        assert!(Preset::parse(&ok.replace("steps = 28", "steps = 0")).is_err());
        assert!(Preset::parse(&ok.replace("family = \"sd3\"", "family = \"sdxl\"")).is_err());
        assert!(Preset::parse(&format!("{ok}\nunknown_key = 1")).is_err());
    }

    #[test]
    fn names_resolve_to_presets_folders_or_repos() {
        let (m, p) = resolve("sd3.5-large", None).unwrap();
        assert_eq!(
            m,
            ModelRef::Hub {
                repo: "stabilityai/stable-diffusion-3.5-large".into(),
                revision: "main".into()
            }
        );
        assert_eq!(p.unwrap().defaults.guidance, Some(3.5));
        let (m, p) = resolve("someone/some-model", Some("v2")).unwrap();
        assert!(p.is_none());
        assert_eq!(
            m,
            ModelRef::Hub {
                repo: "someone/some-model".into(),
                revision: "v2".into()
            }
        );
        assert!(resolve("not a model", None)
            .unwrap_err()
            .to_string()
            .contains("flux.1-dev"));
    }
}
