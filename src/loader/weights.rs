//! Opening safetensors weights: header checks with clear errors, sharded indexes, memory mapping.

use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
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
    Ok(Box::new(Safetensors::open(files)?))
}

/// Memory-mapped safetensors files. float8 weights are widened to f32 as they are read: `F8_E4M3`
/// (PyTorch's `float8_e4m3fn`) and `F8_E5M2`, each multiplied by its `<layer>.scale_weight` when
/// the file has one ("scaled fp8", as ComfyUI publishes Flux and SD3.5).
#[derive(Clone)]
pub struct Safetensors {
    maps: std::sync::Arc<MmapedSafetensors>,
}

impl Safetensors {
    /// Checks each file's header, then maps them.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            check_safetensors(f)?;
        }
        // SAFETY: the files were just validated; they must not be modified while mapped (the Hub
        // cache and model folders are written only by downloads that replace files atomically).
        let maps = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::BadWeights {
            path: files.first().cloned().unwrap_or_default(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            maps: std::sync::Arc::new(maps),
        })
    }

    /// `f(dtype, shape, bytes, done)` with tensor `name`'s bytes as the file stores them, when it is
    /// f32, bf16 or f16 (the dtypes a layer can pack straight from the mapping); None when the
    /// files have no such tensor or it is stored otherwise. `f` may pass `done` parts of the bytes
    /// it has finished reading, whose pages are released at once (parts outside the bytes are
    /// ignored); the whole range's pages are released when `f` returns.
    pub fn with_raw<R>(
        &self,
        name: &str,
        f: impl FnOnce(DType, &[usize], &[u8], &dyn Fn(&[u8])) -> R,
    ) -> Option<R> {
        self.raw(name, true, f)
    }

    /// [`Self::with_raw`] without releasing the range's pages when `f` returns (`done` still
    /// releases the parts given to it): for a layer that reads the bytes where they lie on every
    /// product, whose pages would otherwise be read in again each time.
    pub fn with_raw_resident<R>(
        &self,
        name: &str,
        f: impl FnOnce(DType, &[usize], &[u8], &dyn Fn(&[u8])) -> R,
    ) -> Option<R> {
        self.raw(name, false, f)
    }

    /// [`Self::with_raw`], the whole range released after `f` when `release_all`.
    fn raw<R>(
        &self,
        name: &str,
        release_all: bool,
        f: impl FnOnce(DType, &[usize], &[u8], &dyn Fn(&[u8])) -> R,
    ) -> Option<R> {
        let view = self.maps.get(name).ok()?;
        let dtype = match format!("{:?}", view.dtype()).as_str() {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            _ => return None,
        };
        let data = view.data();
        let (lo, hi) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        let done = |part: &[u8]| {
            let p = part.as_ptr() as usize;
            if lo <= p && p + part.len() <= hi {
                release(part);
            }
        };
        let out = f(dtype, view.shape(), data, &done);
        if release_all {
            release(data);
        }
        Some(out)
    }

    /// Tensor `name` on the CPU: as stored, or widened to f32 and scaled when it is float8. The
    /// tensor is a copy: the range's pages are then released.
    pub fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let view = self.maps.get(name)?;
        // (By name: candle links its own version of the safetensors crate.)
        let table = match format!("{:?}", view.dtype()).as_str() {
            "F8_E4M3" => &*E4M3,
            "F8_E5M2" => &*E5M2,
            _ => {
                // (candle's CPU tensors own their values: `load` copies them out of the mapping.)
                let t = self.maps.load(name, &Device::Cpu)?;
                release(view.data());
                return Ok(t);
            }
        };
        let values: Vec<f32> = view.data().iter().map(|b| table[*b as usize]).collect();
        release(view.data());
        let t = Tensor::from_vec(values, view.shape(), &Device::Cpu)?;
        let Some(scale) = name
            .strip_suffix(".weight")
            .map(|stem| format!("{stem}.scale_weight"))
            .filter(|s| self.maps.get(s).is_ok())
        else {
            return Ok(t);
        };
        let s = self.maps.load(&scale, &Device::Cpu)?.to_dtype(DType::F32)?;
        if s.elem_count() != 1 {
            candle_core::bail!(
                "{scale}: a per-tensor scale has one value, not {:?}",
                s.dims()
            );
        }
        t.broadcast_mul(&s.flatten_all()?)
    }

    /// Tensor `name` at `dtype` on the CPU, converted from the file's bytes in one parallel pass:
    /// f32 rounded to bf16 (nearest even), bf16 or f16 widened to f32 (exactly) -- the values of
    /// [`Self::load`] then candle's `to_dtype`, without the copy at the stored dtype nor the
    /// one-thread conversion (flux-bench's bf16 load from f32 files took 4x diffusers' time). Each
    /// slab's pages are released once read. None for other pairs, unaligned bytes or a tensor the
    /// files do not have (which take that path and its errors).
    fn converted(&self, name: &str, dtype: DType) -> Option<candle_core::Result<Tensor>> {
        use crate::cpu::{convert_slabs, elementwise, values};
        use half::{bf16, f16, slice::HalfFloatSliceExt};
        self.with_raw(name, |stored, shape, bytes, done| {
            let cpu = &Device::Cpu;
            match (stored, dtype) {
                (DType::F32, DType::BF16) => values::<f32>(bytes)
                    .map(|w| Tensor::from_vec(crate::cpu::rounded_to_bf16(w, done), shape, cpu)),
                (DType::BF16, DType::F32) => values::<bf16>(bytes).map(|w| {
                    let v = convert_slabs(w, vec![0f32; w.len()], done, |w, o| {
                        in_pieces(w, o, elementwise::widen_bf16)
                    });
                    Tensor::from_vec(v, shape, cpu)
                }),
                (DType::F16, DType::F32) => values::<f16>(bytes).map(|w| {
                    let v = convert_slabs(w, vec![0f32; w.len()], done, |w, o| {
                        in_pieces(w, o, |w, o| w.convert_to_f32_slice(o))
                    });
                    Tensor::from_vec(v, shape, cpu)
                }),
                _ => None,
            }
        })
        .flatten()
    }
}

/// `f(piece of w, piece of o)` over pieces of 16 Ki values on the rayon pool (w and o of one length).
fn in_pieces<S: Sync, D: Send>(w: &[S], o: &mut [D], f: impl Fn(&[S], &mut [D]) + Sync) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 14;
    o.par_chunks_mut(PIECE)
        .zip(w.par_chunks(PIECE))
        .for_each(|(o, w)| f(w, o));
}

/// Drops this process's resident pages of a range of the mapping (whole pages inside it), once a
/// layer has packed the tensor there or a tensor has been copied out of it: the copy is what the
/// process keeps, and the file's pages stay in the page cache, read again only if the range is
/// touched again.
fn release(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = (data.as_ptr() as usize).next_multiple_of(page);
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `data`, which lies inside a read-only file mapping
            // (memmap2's `Mmap`, via `MmapedSafetensors`). MADV_DONTNEED on a file mapping only
            // unmaps the pages from this process: their contents are unchanged and a later read
            // faults them in again from the file, so every reference into the mapping stays valid.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// Every float8 value in f32, by its bits: `e` exponent bits, `m` mantissa bits, and whether the
/// all-ones exponent holds infinities and NaNs (e5m2, IEEE-like) or only NaN at all-ones (e4m3fn,
/// "finite": its top exponent still holds numbers up to 448).
fn float8_table(e: u32, m: u32, ieee: bool) -> [f32; 256] {
    let mut t = [0f32; 256];
    let bias = (1 << (e - 1)) - 1;
    for (bits, v) in t.iter_mut().enumerate() {
        let b = bits as u32;
        let sign = if b >> 7 == 1 { -1.0f32 } else { 1.0 };
        let exp = (b >> m) & ((1 << e) - 1);
        let man = b & ((1 << m) - 1);
        let top = exp == (1 << e) - 1;
        *v = if ieee && top {
            if man == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            }
        } else if !ieee && top && man == (1 << m) - 1 {
            f32::NAN
        } else if exp == 0 {
            sign * man as f32 / (1 << m) as f32 * 2f32.powi(1 - bias)
        } else {
            sign * (1.0 + man as f32 / (1 << m) as f32) * 2f32.powi(exp as i32 - bias)
        };
    }
    t
}

static E4M3: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| float8_table(4, 3, false));
static E5M2: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| float8_table(5, 2, true));

/// `t` if it has shape `s`, else the error candle's own backends give for tensor `name`.
pub fn expect_shape(t: Tensor, s: candle_core::Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: s,
            got: t.shape().clone(),
        });
    }
    Ok(t)
}

impl SimpleBackend for Safetensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        expect_shape(self.get_unchecked(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.converted(name, dtype) {
            Some(t) => t?.to_device(dev),
            None => self.load(name)?.to_dtype(dtype)?.to_device(dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.maps.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors converted from the mapping at load (f32 to bf16, bf16 and f16 to f32) hold the
    /// values of a copy converted by candle, bit for bit (NaNs as NaNs), across pieces of the
    /// parallel pass; other pairs take candle's path.
    #[test]
    fn converted_tensors_equal_candles_conversion() {
        let dir = std::env::temp_dir().join(format!("mmdit-convert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let mut v: Vec<f32> = crate::cpu::lcg_normal(7 * 10_001, 3.0, 7);
        v[..8].copy_from_slice(&[
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -0.0,
            f32::MAX,
            1.0 + 1.0 / 256.0, // halfway between two bf16 values: rounds to even
        ]);
        let f32s = Tensor::from_slice(&v, (7, 10_001), &Device::Cpu).unwrap();
        let tensors = [
            ("f32", f32s.clone()),
            ("bf16", f32s.to_dtype(DType::BF16).unwrap()),
            ("f16", f32s.to_dtype(DType::F16).unwrap()),
        ];
        candle_core::safetensors::save(
            &tensors
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
            &path,
        )
        .unwrap();
        let st = Safetensors::open(std::slice::from_ref(&path)).unwrap();
        // The values as f32 bits, None for any NaN.
        let bits = |t: &Tensor| -> Vec<Option<u32>> {
            let f = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            f.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| (!x.is_nan()).then(|| x.to_bits()))
                .collect()
        };
        for (name, _) in &tensors {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let want = st.load(name).unwrap().to_dtype(dtype).unwrap();
                let got = st.get_unchecked(name, dtype, &Device::Cpu).unwrap();
                assert_eq!(
                    (got.dtype(), got.dims()),
                    (dtype, want.dims()),
                    "{name} as {dtype:?}"
                );
                assert!(bits(&got) == bits(&want), "{name} as {dtype:?}");
                let fast = matches!(
                    (*name, dtype),
                    ("f32", DType::BF16) | ("bf16", DType::F32) | ("f16", DType::F32)
                );
                assert_eq!(
                    st.converted(name, dtype).is_some(),
                    fast,
                    "{name} as {dtype:?}"
                );
            }
        }
        assert!(st.converted("missing", DType::BF16).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Releasing a tensor's pages once it is copied (or packed) leaves the mapping's contents as
    /// the file has them: the tensor, its neighbours on shared pages and a second read of it are
    /// all the file's values.
    #[test]
    fn released_ranges_read_the_file_again() {
        let dir = std::env::temp_dir().join(format!("mmdit-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        // Unaligned sizes, so that the tensors share pages at both ends.
        let big: Vec<f32> = (0..70_001).map(|i| i as f32 * 0.5 - 7.0).collect();
        let small: Vec<f32> = (0..333).map(|i| -(i as f32)).collect();
        let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &[("a", t(&small)), ("b", t(&big)), ("c", t(&small))]
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
            &path,
        )
        .unwrap();
        let st = Safetensors::open(std::slice::from_ref(&path)).unwrap();
        // Heap memory: released by mistake, its whole pages would read back as zeros.
        let outside = vec![0xABu8; 64 << 10];
        let values = |name: &str| st.load(name).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values("b"), big);
        assert_eq!(values("a"), small);
        assert_eq!(values("c"), small);
        // A part released midway (and one outside the tensor, ignored), the rest read after.
        let raw = st.with_raw("b", |d, s, bytes, done| {
            done(&bytes[1000..bytes.len() / 2]);
            done(&outside);
            (d, s.to_vec(), bytes.to_vec())
        });
        let want: Vec<u8> = big.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(raw, Some((DType::F32, vec![big.len()], want)));
        assert!(outside.iter().all(|&b| b == 0xAB));
        assert_eq!(values("b"), big);
        assert_eq!(values("c"), small);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn float8_tables_hold_the_formats_landmarks() {
        let (e4, e5) = (&*E4M3, &*E5M2);
        assert_eq!(e4[0x38], 1.0);
        assert_eq!(e4[0x7E], 448.0);
        assert!(e4[0x7F].is_nan() && e4[0xFF].is_nan());
        assert_eq!(e4[0x01], 2f32.powi(-9));
        assert_eq!(e4[0xB8], -1.0);
        assert_eq!(e5[0x3C], 1.0);
        assert_eq!(e5[0x7B], 57344.0);
        assert_eq!(e5[0x7C], f32::INFINITY);
        assert!(e5[0x7D].is_nan());
        assert_eq!(e5[0x01], 2f32.powi(-16));
    }
}
