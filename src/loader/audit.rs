//! Checking weights against a model without loading them: a candle backend that knows only names and
//! shapes (from safetensors headers or a manifest), hands out zero-stride placeholder tensors, and
//! records what the model asked for. Building a model on it lists every missing, unexpected and
//! wrong-shaped tensor in one pass, in seconds, on any model size.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A tensor as a header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: String,
}

#[derive(Default)]
struct Log {
    requested: BTreeMap<String, usize>,
    missing: Vec<(String, Vec<usize>)>,
    wrong: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// A backend over names and shapes only.
pub struct ShapeBackend {
    tensors: BTreeMap<String, TensorMeta>,
    log: Mutex<Log>,
}

/// What building a model on a [`ShapeBackend`] found.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Parameters the model reads (name -> times requested).
    pub requested: BTreeMap<String, usize>,
    /// Parameters the model needs that the files lack: (name, expected shape).
    pub missing: Vec<(String, Vec<usize>)>,
    /// (name, expected shape, shape in the files).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors in the files the model never reads.
    pub unexpected: Vec<String>,
    /// Parameter count and bytes per dtype of the tensors in the files.
    pub params: usize,
    /// Parameter count of the tensors the model reads at the shape the files hold (`requested`).
    pub read_params: usize,
    pub dtypes: BTreeMap<String, usize>,
}

impl Audit {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.wrong_shape.is_empty() && self.unexpected.is_empty()
    }
}

impl ShapeBackend {
    pub fn new(tensors: BTreeMap<String, TensorMeta>) -> Self {
        Self {
            tensors,
            log: Mutex::new(Log::default()),
        }
    }

    /// Builds a model with `build` on these shapes and reports what matched. `ignore(name)` marks
    /// tensors in the files the engine deliberately does not read (e.g. the VAE encoder).
    pub fn audit(
        tensors: BTreeMap<String, TensorMeta>,
        build: impl FnOnce(VarBuilder) -> Result<()>,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<Audit> {
        let params = tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let mut dtypes = BTreeMap::new();
        for t in tensors.values() {
            *dtypes.entry(t.dtype.clone()).or_insert(0) += t.shape.iter().product::<usize>();
        }
        let names: Vec<String> = tensors.keys().cloned().collect();
        let numel: BTreeMap<String, usize> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.iter().product()))
            .collect();
        let backend = std::sync::Arc::new(Self::new(tensors));
        let vb =
            VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu);
        build(vb)?;
        let log = std::mem::take(&mut *backend.log.lock().expect("no poisoned lock"));
        let is_wrong = |n: &String| log.wrong.iter().any(|w| &w.0 == n);
        let unexpected = names
            .into_iter()
            .filter(|n| !log.requested.contains_key(n) && !is_wrong(n) && !ignore(n))
            .collect();
        let read_params = log.requested.keys().filter_map(|n| numel.get(n)).sum();
        Ok(Audit {
            read_params,
            requested: log.requested,
            missing: log.missing,
            wrong_shape: log.wrong,
            unexpected,
            params,
            dtypes,
        })
    }
}

struct Shared(std::sync::Arc<ShapeBackend>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let want = s.dims().to_vec();
        let mut log = self.0.log.lock().expect("no poisoned lock");
        match self.0.tensors.get(name) {
            None => log.missing.push((name.to_string(), want)),
            Some(t) if t.shape != want => log.wrong.push((name.to_string(), want, t.shape.clone())),
            Some(_) => *log.requested.entry(name.to_string()).or_insert(0) += 1,
        }
        // A zero-stride view: the right shape, one element of memory.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self
            .0
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        self.0
            .log
            .lock()
            .expect("no poisoned lock")
            .requested
            .insert(name.to_string(), 1);
        Tensor::zeros((), dtype, dev)?.broadcast_as(t.shape.clone())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// Names, shapes and dtypes from safetensors headers (only the headers are read).
pub fn read_headers(files: &[std::path::PathBuf]) -> crate::Result<BTreeMap<String, TensorMeta>> {
    let mut out = BTreeMap::new();
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| crate::Error::io(f, e))?;
        // SAFETY: read-only map; only the header pages are touched.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(f, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            crate::Error::BadWeights {
                path: f.clone(),
                msg: format!("invalid safetensors ({e})"),
            }
        })?;
        for (name, info) in meta.tensors() {
            out.insert(
                name,
                TensorMeta {
                    shape: info.shape.clone(),
                    dtype: format!("{:?}", info.dtype),
                },
            );
        }
    }
    Ok(out)
}
