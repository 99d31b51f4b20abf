//! Where model files come from (a local folder or the Hugging Face Hub) and how weights are opened.

pub mod audit;
pub mod gguf;
pub mod hub;
pub mod single;
pub mod weights;

use crate::error::{Error, Message, Param, Result};
use std::path::{Path, PathBuf};

/// A reference to a model as the user types it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A local folder in diffusers layout.
    Folder(PathBuf),
    /// A Hub repository id (`org/name`) at a revision.
    Hub { repo: String, revision: String },
    /// An original single-file checkpoint (SAI SD3/SD3.5, BFL FLUX.1; safetensors, or GGUF as
    /// stable-diffusion.cpp and ComfyUI-GGUF name it) and the model that completes
    /// it: configs, tokenizers, scheduler, and the components the file lacks. Without `components`,
    /// the preset of the detected variant.
    SingleFile {
        file: PathBuf,
        components: Option<Box<ModelRef>>,
    },
}

impl ModelRef {
    /// A path that exists is a folder or a `.safetensors` / `.gguf` single-file checkpoint; `org/name` is a Hub
    /// repo; anything else is an error that says what was expected.
    pub fn parse(s: &str, revision: Option<&str>) -> Result<Self> {
        let p = Path::new(s);
        if p.exists() {
            if p.is_dir() {
                return Ok(ModelRef::Folder(p.to_path_buf()));
            }
            let ext = p
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default()
                .to_ascii_lowercase();
            return match ext.as_str() {
                "safetensors" | "gguf" => Ok(ModelRef::SingleFile {
                    file: p.to_path_buf(),
                    components: None,
                }),
                "ckpt" | "pt" | "pth" | "bin" => Err(Error::invalid(Param::Model, format!(
                    " {s}: pickle checkpoints are not loaded (they can run code); use the .safetensors version"
                ))),
                _ => Err(Error::invalid(Param::Model, format!(
                    " {s}: is a file but not a .safetensors or .gguf checkpoint; pass a single-file .safetensors or .gguf checkpoint, a model folder in diffusers layout (with model_index.json) or a Hub repo id"
                ))),
            };
        }
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |x: &str| {
            !x.is_empty()
                && x.len() <= 96
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !x.starts_with('.')
        };
        if parts.len() == 2 && parts.iter().all(|x| valid(x)) {
            return Ok(ModelRef::Hub {
                repo: s.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            });
        }
        Err(Error::invalid(
            Param::Model,
            format!(" {s}: no such folder, and not a Hub repo id of the form org/name"),
        ))
    }

    pub fn describe(&self) -> String {
        match self {
            ModelRef::Folder(p) => p.display().to_string(),
            ModelRef::Hub { repo, revision } if revision == "main" => repo.clone(),
            ModelRef::Hub { repo, revision } => format!("{repo}@{revision}"),
            ModelRef::SingleFile { file, .. } => file.display().to_string(),
        }
    }
}

/// Gives local paths for files of a model, fetching them first when they live on the Hub.
pub trait FileSource: Send + Sync {
    /// Local path of `rel` (e.g. `transformer/config.json`), or `None` when the model has no such file.
    fn file(&self, rel: &str) -> Result<Option<PathBuf>>;
    /// Human-readable name of the model, for messages.
    fn name(&self) -> String;
    /// Appended to "missing file" errors (e.g. why an offline Hub cache lacks it).
    fn missing_hint(&self) -> String {
        String::new()
    }
}

/// A local folder in diffusers layout.
pub struct FolderSource {
    root: PathBuf,
}

impl FolderSource {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }
}

impl FileSource for FolderSource {
    fn file(&self, rel: &str) -> Result<Option<PathBuf>> {
        let p = self.root.join(rel);
        if !p.is_file() {
            return Ok(None);
        }
        check_inside(&p, &self.root)?;
        Ok(Some(p))
    }
    fn name(&self) -> String {
        self.root.display().to_string()
    }
}

/// Opens the source a reference points at (for a single file: the source of its components).
pub fn open(model: &ModelRef) -> Result<Box<dyn FileSource>> {
    Ok(match model {
        ModelRef::Folder(p) => Box::new(FolderSource::new(p.clone())),
        ModelRef::Hub { repo, revision } => Box::new(hub::HubSource::new(repo, revision)?),
        ModelRef::SingleFile {
            components: Some(c),
            ..
        } => open(c)?,
        ModelRef::SingleFile {
            file,
            components: None,
        } => return Err(needs_components(file)),
    })
}

/// The error for a single-file checkpoint opened without the model that completes it.
pub fn needs_components(file: &Path) -> Error {
    Error::InvalidRequest(
        Message::from(format!(
            "{}: a single-file checkpoint needs ",
            file.display()
        ))
        .param(Param::Components)
        .text(" (a preset, folder or Hub repo with its configs and tokenizers)"),
    )
}

/// The local path of a file the model must have.
pub fn require(src: &dyn FileSource, rel: &str) -> Result<PathBuf> {
    src.file(rel)?.ok_or_else(|| {
        Error::MissingFile(format!(
            "{}: `{rel}` is missing; the model is incomplete or not in diffusers layout{}",
            src.name(),
            src.missing_hint()
        ))
    })
}

/// The weight files of a component folder: a sharded index (`<stem>.safetensors.index.json`) or a
/// single `<stem>.safetensors`, for each stem in order. Pickle-only components are refused.
pub fn component_weights(src: &dyn FileSource, dir: &str, stems: &[&str]) -> Result<Vec<PathBuf>> {
    for stem in stems {
        if let Some(index) = src.file(&format!("{dir}/{stem}.safetensors.index.json"))? {
            let shards = weights::shards_of_index(&index)?;
            return shards
                .iter()
                .map(|s| require(src, &format!("{dir}/{s}")))
                .collect();
        }
        if let Some(p) = src.file(&format!("{dir}/{stem}.safetensors"))? {
            return Ok(vec![p]);
        }
    }
    for stem in stems {
        for ext in ["bin", "pt", "pth", "ckpt"] {
            if let Some(p) = src.file(&format!("{dir}/{stem}.{ext}"))? {
                return Err(Error::BadWeights {
                    path: p,
                    msg: "pickle checkpoints are not loaded (they can run code); use the .safetensors version of this model".into(),
                });
            }
        }
    }
    Err(Error::MissingFile(format!(
        "{}: no weights in `{dir}/` (expected {}.safetensors or a sharded index); download the complete model{}",
        src.name(),
        stems[0],
        src.missing_hint()
    )))
}

/// Refuses a file that resolves (through symbolic links) outside `root`.
pub fn check_inside(file: &Path, root: &Path) -> Result<()> {
    let real = file.canonicalize().map_err(|e| Error::io(file, e))?;
    let root_real = root.canonicalize().map_err(|e| Error::io(root, e))?;
    if real.starts_with(&root_real) {
        Ok(())
    } else {
        Err(Error::BadWeights {
            path: file.to_path_buf(),
            msg: format!(
                "is a symbolic link to {}, outside the model folder {}; copy the file into the folder instead",
                real.display(),
                root_real.display()
            ),
        })
    }
}
