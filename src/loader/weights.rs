//! Opening safetensors weights: header checks with clear errors, sharded indexes, memory mapping.

use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

#[derive(serde::Deserialize)]
struct Index {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The shard file names a `*.safetensors.index.json` names, each a plain relative path inside the
/// component folder (no `..`, no absolute paths).
pub fn shards_of_index(index: &Path) -> Result<Vec<String>> {
    let idx: Index = crate::config::read_json(index)?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in &idx.weight_map {
        let p = Path::new(file);
        let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || file.is_empty() {
            return Err(Error::BadWeights {
                path: index.to_path_buf(),
                msg: format!("tensor `{tensor}` points outside the model folder ({file:?})"),
            });
        }
        shards.insert(file.clone());
    }
    if shards.is_empty() {
        return Err(Error::BadWeights {
            path: index.to_path_buf(),
            msg: "the index names no weight files".into(),
        });
    }
    Ok(shards.into_iter().collect())
}

/// Checks a safetensors file's header (length, JSON, dtypes, offsets, sizes) without reading the
/// tensor data, so a damaged download is named before anything is mapped.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only for this check; a file truncated concurrently is
    // a race we accept like every mmap-based loader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    check_safetensors_bytes(&mmap, path)
}

/// [`check_safetensors`] on bytes already in memory; `path` names them in errors.
pub fn check_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<()> {
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::BadWeights {
        path: path.to_path_buf(),
        msg: format!("invalid safetensors ({e})"),
    })?;
    Ok(())
}

/// Memory-maps checked weight files as one [`VarBuilder`] at `dtype`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    Ok(VarBuilder::from_backend(
        backend(files)?,
        dtype,
        device.clone(),
    ))
}

/// Memory-maps checked weight files as one backend (for a [`VarBuilder`], or wrapped by one that
/// changes the weights, as LoRA merging does).
pub fn backend(files: &[PathBuf]) -> Result<Box<dyn SimpleBackend>> {
    for f in files {
        check_safetensors(f)?;
    }
    // SAFETY: the files were just validated; they must not be modified while mapped (the Hub cache
    // and model folders are written only by downloads that replace files atomically).
    let m = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::BadWeights {
        path: files.first().cloned().unwrap_or_default(),
        msg: e.to_string(),
    })?;
    Ok(Box::new(m))
}
