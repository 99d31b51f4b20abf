//! GGUF files (the ggml container stable-diffusion.cpp and ComfyUI-GGUF run Flux and SD3.5 from):
//! the header read and checked with every count and size bounded by the file's length before
//! anything is allocated, tensors read by row range straight from the file (no mapping, so only
//! the tensor being read is resident), as GGML blocks for candle's quantized kernels or
//! dequantized.
//!
//! Layout (gguf spec, versions 2 and 3; version 1 used 32-bit counts and is refused): magic
//! `GGUF`, version, tensor count, metadata count, the metadata (key, type, value), the tensor
//! infos (name, dimensions innermost first, type, offset into the data section), padding to
//! `general.alignment` (32 by default), the data.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A metadata value (arrays are kept as their length and element type: nothing here reads them).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array {
        len: u64,
        elem: u32,
    },
    /// A short array of integers (ComfyUI-GGUF's `comfy.gguf.orig_shape.*`).
    Ints(Vec<i64>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(v) => write!(f, "{v:?}"),
            Value::Array { len, .. } => write!(f, "[{len} values]"),
            Value::Ints(v) => write!(f, "{v:?}"),
        }
    }
}

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    /// Outermost first, as candle and PyTorch order them (the file stores them innermost first);
    /// ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>` when the file has it.
    pub shape: Vec<usize>,
    /// The shape the data is stored in, when `shape` came from `orig_shape`.
    pub stored: Option<Vec<usize>>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Elements of one row (everything but the outermost dimension).
    pub fn row_elems(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Whether rows of `shape` are whole blocks, so row ranges can be read as blocks.
    pub fn rows_are_blocks(&self) -> bool {
        self.row_elems().is_multiple_of(self.dtype.block_size())
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.row_elems() / self.dtype.block_size() * self.dtype.type_size()
    }

    fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// GGML types by their id in the file: (id, name, the type when candle computes it). Types that
/// exist but are not computed here are listed so they are refused by name.
const TYPES: &[(u32, &str, Option<GgmlDType>)] = &[
    (0, "F32", Some(GgmlDType::F32)),
    (1, "F16", Some(GgmlDType::F16)),
    (2, "Q4_0", Some(GgmlDType::Q4_0)),
    (3, "Q4_1", Some(GgmlDType::Q4_1)),
    (6, "Q5_0", Some(GgmlDType::Q5_0)),
    (7, "Q5_1", Some(GgmlDType::Q5_1)),
    (8, "Q8_0", Some(GgmlDType::Q8_0)),
    (9, "Q8_1", None),
    (10, "Q2_K", Some(GgmlDType::Q2K)),
    (11, "Q3_K", Some(GgmlDType::Q3K)),
    (12, "Q4_K", Some(GgmlDType::Q4K)),
    (13, "Q5_K", Some(GgmlDType::Q5K)),
    (14, "Q6_K", Some(GgmlDType::Q6K)),
    (15, "Q8_K", None),
    (16, "IQ2_XXS", None),
    (17, "IQ2_XS", None),
    (18, "IQ3_XXS", None),
    (19, "IQ1_S", None),
    (20, "IQ4_NL", None),
    (21, "IQ3_S", None),
    (22, "IQ2_S", None),
    (23, "IQ4_XS", None),
    (24, "I8", None),
    (25, "I16", None),
    (26, "I32", None),
    (27, "I64", None),
    (28, "F64", None),
    (29, "IQ1_M", None),
    (30, "BF16", Some(GgmlDType::BF16)),
    (34, "TQ1_0", None),
    (35, "TQ2_0", None),
    (39, "MXFP4", None),
];

/// A computed type's name as GGUF tools print it (`Q8_0`, `Q4_K`, `BF16`).
pub fn type_name(dtype: GgmlDType) -> &'static str {
    TYPES
        .iter()
        .find(|(_, _, t)| *t == Some(dtype))
        .map_or("?", |(_, n, _)| n)
}

/// The type with this id, or an error that names it.
fn type_of(id: u32) -> std::result::Result<GgmlDType, String> {
    match TYPES.iter().find(|(i, _, _)| *i == id) {
        Some((_, _, Some(t))) => Ok(*t),
        Some((_, n, None)) if n.starts_with("IQ") || n.starts_with("TQ") => Err(format!(
            "is {n}, an importance-matrix/ternary type this engine does not compute; use a Q8_0, Q6_K, Q5_K, Q4_K, Q4_0 (or other Q/K-quant) file"
        )),
        Some((_, n, None)) => Err(format!(
            "is {n}, a type no image-model GGUF uses and this engine does not compute; use a Q/K-quant, F16, BF16 or F32 file"
        )),
        None => Err(format!(
            "has GGML type id {id}, which this engine does not know; use a Q/K-quant, F16, BF16 or F32 file"
        )),
    }
}

/// Bounds on what a header may declare, checked before anything of that size is allocated.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_METADATA: u64 = 1 << 20;
const MAX_KEY: u64 = 1 << 16;
const MAX_DIMS: u32 = 4;
const MAX_ELEMENTS: u64 = 1 << 48;
const MAX_NESTING: usize = 4;

/// An open GGUF file: its header; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    file: std::fs::File,
}

/// Reads the header with every length checked against what is left of the file.
struct Header<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Header<R> {
    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos, self.len
            ));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += n;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, max: u64, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > max {
            return Err(format!("{what} is {n} bytes long, more than {max}"));
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// A value of type `ty`.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> std::result::Result<Value, String> {
        let what = format!("metadata `{key}`");
        Ok(match ty {
            0 => Value::Int(self.bytes(1, &what)?[0] as i64),
            1 => Value::Int(self.bytes(1, &what)?[0] as i8 as i64),
            2 => {
                let b = self.bytes(2, &what)?;
                Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64)
            }
            3 => {
                let b = self.bytes(2, &what)?;
                Value::Int(i16::from_le_bytes([b[0], b[1]]) as i64)
            }
            4 => Value::Int(self.u32(&what)? as i64),
            5 => Value::Int(self.u32(&what)? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32(&what)?) as f64),
            7 => Value::Bool(self.bytes(1, &what)?[0] != 0),
            8 => Value::Str(self.string(self.len, &what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("{what} nests arrays more than {MAX_NESTING} deep"));
                }
                let elem = self.u32(&what)?;
                let len = self.u64(&what)?;
                // Every element takes at least one byte: a count beyond the file is a lie.
                if len > self.len.saturating_sub(self.pos) {
                    return Err(format!(
                        "{what} declares {len} elements, more than the file's remaining bytes"
                    ));
                }
                let mut ints = Vec::new();
                for _ in 0..len {
                    if let Value::Int(i) = self.value(elem, key, depth + 1)? {
                        if len <= 8 {
                            ints.push(i);
                        }
                    }
                }
                if ints.len() as u64 == len && len > 0 {
                    Value::Ints(ints)
                } else {
                    Value::Array { len, elem }
                }
            }
            10 => Value::Int(self.u64(&what)? as i64),
            11 => Value::Int(self.u64(&what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(&what)?)),
            t => return Err(format!("{what} has unknown value type {t}")),
        })
    }
}

impl GgufFile {
    /// Opens `path` and reads its header; a damaged or foreign file is named here, before any
    /// tensor is read.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadWeights {
            path: path.to_path_buf(),
            msg,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut h = Header {
            r: BufReader::new(&file),
            pos: 0,
            len,
        };
        let magic = h
            .bytes(4, "the magic number")
            .map_err(|_| bad("not a GGUF file (shorter than its 4-byte magic)".into()))?;
        if magic != b"GGUF" {
            return Err(bad(format!(
                "not a GGUF file (starts with {:?}, not \"GGUF\"); pass a .gguf model file",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = h.u32("the version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are); convert the file again with a current gguf tool"
            )));
        }
        let n_tensors = h.u64("the tensor count").map_err(bad)?;
        let n_meta = h.u64("the metadata count").map_err(bad)?;
        // A tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
        let room = len.saturating_sub(h.pos);
        if n_tensors > MAX_TENSORS || n_tensors.saturating_mul(32) > room {
            return Err(bad(format!(
                "the header declares {n_tensors} tensors, more than the {room} bytes after it can hold; the file is truncated or damaged"
            )));
        }
        if n_meta > MAX_METADATA || n_meta.saturating_mul(13) > room {
            return Err(bad(format!(
                "the header declares {n_meta} metadata entries, more than the {room} bytes after it can hold; the file is truncated or damaged"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = h.string(MAX_KEY, "a metadata key").map_err(bad)?;
            let ty = h.u32("a metadata type").map_err(bad)?;
            let v = h.value(ty, &key, 0).map_err(bad)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = h.string(MAX_KEY, "a tensor name").map_err(bad)?;
            let tensor = |m: String| bad(format!("tensor `{name}` {m}"));
            let n_dims = h.u32("a dimension count").map_err(bad)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(tensor(format!(
                    "has {n_dims} dimensions (1 to {MAX_DIMS} are valid); the file is damaged"
                )));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(h.u64("a dimension").map_err(bad)?);
            }
            let id = h.u32("a tensor type").map_err(bad)?;
            let offset = h.u64("a tensor offset").map_err(bad)?;
            let dtype = type_of(id).map_err(tensor)?;
            let elems = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e > 0 && e <= MAX_ELEMENTS)
                .ok_or_else(|| {
                    tensor(format!(
                        "has dimensions {shape:?} (innermost first), no elements or more than any model has; the file is damaged"
                    ))
                })?;
            let block = dtype.block_size() as u64;
            if !shape[0].is_multiple_of(block) {
                return Err(tensor(format!(
                    "has rows of {} values, not a whole number of {} blocks of {block}; the file is damaged",
                    shape[0],
                    type_name(dtype)
                )));
            }
            let bytes = elems / block * dtype.type_size() as u64;
            shape.reverse();
            infos.push((
                name,
                TensorInfo {
                    dtype,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                    stored: None,
                    offset,
                    bytes,
                },
            ));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(Value::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(bad(format!(
                    "general.alignment is {v}, not a power of two; the file is damaged"
                )))
            }
        };
        let data = h.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, mut t) in infos {
            if let Some(v) = metadata.get(&format!("comfy.gguf.orig_shape.{name}")) {
                let orig: Vec<usize> = match v {
                    Value::Ints(d) => d.iter().map(|&x| x.max(0) as usize).collect(),
                    _ => Vec::new(),
                };
                if orig.is_empty()
                    || orig.iter().product::<usize>() != t.shape.iter().product::<usize>()
                {
                    return Err(bad(format!(
                        "comfy.gguf.orig_shape.{name} is {v}, not a shape of the tensor's {:?}; the file is damaged",
                        t.shape
                    )));
                }
                t.stored = Some(std::mem::replace(&mut t.shape, orig));
            }
            let start = data.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= len => t.offset = s,
                _ => {
                    return Err(bad(format!(
                        "tensor `{name}` lies past the end of the file ({} bytes at data offset {}, the file has {len}); the download is incomplete",
                        t.bytes, t.offset
                    )))
                }
            }
            if tensors.insert(name.clone(), t).is_some() {
                return Err(bad(format!(
                    "tensor `{name}` is listed twice; the file is damaged"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            file,
        })
    }

    /// `general.architecture` (flux, sd3, llama, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture")?.as_str()
    }

    /// Names, shapes and type names of the tensors, as a header listing (`Q8_0`, `BF16`, ...).
    pub fn metas(&self) -> BTreeMap<String, super::audit::TensorMeta> {
        self.tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    super::audit::TensorMeta {
                        shape: t.shape.clone(),
                        dtype: type_name(t.dtype).to_string(),
                    },
                )
            })
            .collect()
    }

    fn info(&self, key: &str) -> candle_core::Result<&TensorInfo> {
        self.tensors
            .get(key)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: key.into() })
    }

    /// Rows `ranges` (each `start..start + len` along the outermost dimension, concatenated) of
    /// tensor `key` as GGML blocks on the CPU. Rows are whole blocks (checked at open), so slicing
    /// them is exact for every type.
    pub fn blocks(&self, key: &str, ranges: &[(usize, usize)]) -> candle_core::Result<QTensor> {
        let t = self.block_info(key)?;
        self.read(key, t, ranges)
    }

    /// [`Self::blocks`] as the file stores them: type, shape and bytes (for the kernels that take
    /// GGML blocks as they are, [`crate::cpu::qgemm`] by way of the layers).
    pub fn block_bytes(
        &self,
        key: &str,
        ranges: &[(usize, usize)],
    ) -> candle_core::Result<BlockBytes> {
        let t = self.block_info(key)?;
        let (shape, len) = Self::rows_of(t, ranges);
        let mut bytes = vec![0u8; len];
        self.read_into(key, t, ranges, &mut bytes)?;
        Ok((t.dtype, shape, bytes))
    }

    fn block_info(&self, key: &str) -> candle_core::Result<&TensorInfo> {
        let t = self.info(key)?;
        if !t.rows_are_blocks() {
            candle_core::bail!("{key}: rows of {:?} are not whole blocks", t.shape);
        }
        Ok(t)
    }

    /// The shape and byte length of rows `ranges` of `t`.
    fn rows_of(t: &TensorInfo, ranges: &[(usize, usize)]) -> (Vec<usize>, usize) {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let mut shape = t.shape.clone();
        if let Some(d) = shape.first_mut() {
            *d = total;
        }
        (shape, total * t.row_bytes())
    }

    fn read(
        &self,
        key: &str,
        t: &TensorInfo,
        ranges: &[(usize, usize)],
    ) -> candle_core::Result<QTensor> {
        let (shape, len) = Self::rows_of(t, ranges);
        // u64 storage keeps the bytes 8-aligned, as candle reinterprets them as blocks of f16/f32
        // fields (at most 4-byte alignment).
        let mut buf = vec![0u64; len.div_ceil(8)];
        // SAFETY: a u64 buffer viewed as its own bytes; the length is within the allocation.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), len) };
        self.read_into(key, t, ranges, bytes)?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(t.dtype, bytes, shape, &Device::Cpu)
    }

    /// Reads rows `ranges` of `t` into `dst` (their length, [`Self::rows_of`]).
    fn read_into(
        &self,
        key: &str,
        t: &TensorInfo,
        ranges: &[(usize, usize)],
        dst: &mut [u8],
    ) -> candle_core::Result<()> {
        let row = t.row_bytes();
        let mut at = 0;
        for &(start, len) in ranges {
            if start + len > t.rows() {
                candle_core::bail!("{key}: rows {start}..{} of {}", start + len, t.rows());
            }
            self.file
                .read_exact_at(
                    &mut dst[at..at + len * row],
                    t.offset + (start * row) as u64,
                )
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.path.display())))?;
            at += len * row;
        }
        Ok(())
    }

    /// The whole tensor `key` in f32 (dequantized; F16/BF16 widened exactly).
    pub fn dequantized(&self, key: &str) -> candle_core::Result<Tensor> {
        let t = self.info(key)?;
        match &t.stored {
            Some(stored) => {
                let whole = TensorInfo {
                    shape: stored.clone(),
                    stored: None,
                    ..t.clone()
                };
                self.read(key, &whole, &[(0, whole.rows())])?
                    .dequantize(&Device::Cpu)?
                    .reshape(t.shape.clone())
            }
            None => self.blocks(key, &[(0, t.rows())])?.dequantize(&Device::Cpu),
        }
    }
}

/// A tensor's rows as a GGUF file stores them: type, shape (outermost first) and bytes.
pub type BlockBytes = (GgmlDType, Vec<usize>, Vec<u8>);

/// A tensor to be written: its name, shape (outermost first) and type.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl Planned {
    /// Its data's bytes.
    pub fn bytes(&self) -> u64 {
        let elems: usize = self.shape.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

const ALIGNMENT: u64 = 32;

/// Writes a GGUF file (version 3, 32-byte alignment): `metadata` (strings and u32 values), then
/// each planned tensor's data as `data(i)` returns it (its bytes, in the planned type), one at a
/// time. It is written to `<path>.partial` and renamed when complete, so a failure leaves nothing
/// behind under `path`. Returns the file's size.
pub fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[Planned],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    use std::io::Write;
    let mut h: Vec<u8> = Vec::new();
    let string = |h: &mut Vec<u8>, s: &str| {
        h.extend_from_slice(&(s.len() as u64).to_le_bytes());
        h.extend_from_slice(s.as_bytes());
    };
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut h, k);
        match v {
            Value::Str(s) => {
                h.extend_from_slice(&8u32.to_le_bytes());
                string(&mut h, s);
            }
            Value::Int(i) => {
                h.extend_from_slice(&4u32.to_le_bytes());
                h.extend_from_slice(&(*i as u32).to_le_bytes());
            }
            other => {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "gguf::write: metadata `{k}` = {other} is not written"
                ))))
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        let id = TYPES
            .iter()
            .find(|(_, _, ty)| *ty == Some(t.dtype))
            .map_or(0, |(i, _, _)| *i);
        h.extend_from_slice(&id.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset += t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    h.resize(
        (h.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
        0,
    );
    let partial = path.with_extension("gguf.partial");
    let io = |e| Error::io(&partial, e);
    let result = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
        f.write_all(&h).map_err(io)?;
        let mut size = h.len() as u64;
        for (i, t) in tensors.iter().enumerate() {
            let b = data(i)?;
            if b.len() as u64 != t.bytes() {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "gguf::write: `{}` has {} bytes, its type and shape take {}",
                    t.name,
                    b.len(),
                    t.bytes()
                ))));
            }
            f.write_all(&b).map_err(io)?;
            let pad = t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT - t.bytes();
            f.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            size += t.bytes() + pad;
        }
        f.flush().map_err(io)?;
        Ok(size)
    })();
    match result {
        Ok(size) => {
            std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))?;
            Ok(size)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_computed_type_has_one_id_and_its_name() {
        for (id, name, t) in TYPES {
            if let Some(t) = t {
                assert_eq!(type_of(*id), Ok(*t));
                assert_eq!(type_name(*t), *name);
            }
        }
        assert!(type_of(16).unwrap_err().contains("IQ2_XXS"));
        assert!(type_of(99).unwrap_err().contains("99"));
    }
}
