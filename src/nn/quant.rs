//! Weights quantized at load into GGML blocks (stable-diffusion.cpp's `--type`), computed on
//! [`crate::cpu::qgemm`] (candle's quantized kernels where the CPU lacks AVX-512 VNNI): the
//! activations are quantized to 8-bit blocks and the products run as integer dot products.
//!
//! A [`super::linear`] built inside [`with`] quantizes its weight when its input width is a whole
//! number of the type's blocks (32 values, 256 for the K types), a K type falling back to a
//! 32-value type where it does not fit ([`fit`], as llama.cpp does); other layers keep their
//! dtype. Like the LoRA slots, the setting is a thread-local that exists only while `with` runs,
//! so model constructors keep their signatures. Weights a GGUF file stores in blocks reach the
//! layers the same way ([`with_stored`]).

use candle_core::quantized::{GgmlDType, QTensor};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// Weights a file already stores in GGML blocks (a GGUF model), by their checkpoint name
/// (`transformer_blocks.0.attn.to_q.weight`): `None` for a tensor stored otherwise.
pub type Stored = Arc<dyn Fn(&str) -> Option<candle_core::Result<StoredWeight>> + Send + Sync>;

/// A weight in GGML blocks as a file stores it: type, shape (outermost first) and bytes.
pub struct StoredWeight {
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// `bytes` (GGML blocks of `dtype`) as candle's quantized tensor on the CPU, for its kernels (the
/// fallback where [`crate::cpu::qgemm`] is not available).
pub(super) fn qtensor(
    dtype: GgmlDType,
    shape: Vec<usize>,
    bytes: &[u8],
) -> candle_core::Result<QTensor> {
    // candle reads the bytes as blocks of f16/f32 fields: copy them to 8-byte alignment first.
    let mut buf = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: a u64 buffer viewed as its own bytes; the length is within the allocation.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), bytes.len()) };
    aligned.copy_from_slice(bytes);
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        aligned,
        shape,
        &candle_core::Device::Cpu,
    )
}

thread_local! {
    static MODE: Cell<Option<GgmlDType>> = const { Cell::new(None) };
    static STORED: RefCell<Option<Stored>> = const { RefCell::new(None) };
}

/// Runs `build` with every [`super::linear`] whose weight `stored` has taking those blocks as
/// they are (read once, never dequantized), the others built as usual.
pub fn with_stored<T>(stored: Option<Stored>, build: impl FnOnce() -> T) -> T {
    let outer = STORED.with(|s| s.replace(stored));
    let out = build();
    STORED.with(|s| *s.borrow_mut() = outer);
    out
}

/// The stored blocks of weight `name`, if the file has it in blocks.
pub(super) fn stored(name: &str) -> Option<candle_core::Result<StoredWeight>> {
    let f = STORED.with(|s| s.borrow().clone())?;
    f(name)
}

/// Runs `build` with every [`super::linear`] it makes quantized to `dtype` (where its shape allows).
pub fn with<T>(dtype: Option<GgmlDType>, build: impl FnOnce() -> T) -> T {
    let outer = MODE.with(|m| m.replace(dtype));
    let out = build();
    MODE.with(|m| m.set(outer));
    out
}

/// The type layers built now are quantized to.
pub(super) fn current() -> Option<GgmlDType> {
    MODE.with(Cell::get)
}

/// The block types `--quantize` takes, by their GGUF names.
pub const TYPES: &[(&str, GgmlDType)] = &[
    ("q8_0", GgmlDType::Q8_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q5_1", GgmlDType::Q5_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q4_k", GgmlDType::Q4K),
    ("q4_1", GgmlDType::Q4_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q3_k", GgmlDType::Q3K),
    ("q2_k", GgmlDType::Q2K),
];

/// A type by its name (`q8_0`, `q4_k`, ...).
pub fn parse(name: &str) -> Option<GgmlDType> {
    let n = name.to_ascii_lowercase();
    TYPES.iter().find(|(k, _)| *k == n).map(|(_, t)| *t)
}

/// The type a layer whose rows hold `cols` values is quantized to when `want` is asked for:
/// `want` when a row is whole blocks of it; for a K type (256-value blocks) that does not fit, the
/// 32-value type llama.cpp falls back to (Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0, Q3_K and Q2_K
/// -> Q4_0); `None` when nothing fits (the layer keeps its float type).
pub fn fit(want: GgmlDType, cols: usize) -> Option<GgmlDType> {
    let t = if cols.is_multiple_of(want.block_size()) {
        want
    } else {
        match want {
            GgmlDType::Q6K => GgmlDType::Q8_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q3K | GgmlDType::Q2K => GgmlDType::Q4_0,
            _ => return None,
        }
    };
    cols.is_multiple_of(t.block_size()).then_some(t)
}

/// A type's name.
pub fn name(dtype: GgmlDType) -> &'static str {
    TYPES
        .iter()
        .find(|(_, t)| *t == dtype)
        .map_or("?", |(k, _)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_setting_is_scoped() {
        for (n, t) in TYPES {
            assert_eq!(parse(n), Some(*t));
            assert_eq!(name(*t), *n);
        }
        assert_eq!(parse("Q4_K"), Some(GgmlDType::Q4K));
        assert_eq!(parse("q9"), None);
        assert_eq!(current(), None);
        with(Some(GgmlDType::Q8_0), || {
            assert_eq!(current(), Some(GgmlDType::Q8_0))
        });
        assert_eq!(current(), None);
        assert_eq!(fit(GgmlDType::Q4K, 512), Some(GgmlDType::Q4K));
        assert_eq!(fit(GgmlDType::Q4K, 128), Some(GgmlDType::Q5_0));
        assert_eq!(fit(GgmlDType::Q6K, 96), Some(GgmlDType::Q8_0));
        assert_eq!(fit(GgmlDType::Q2K, 64), Some(GgmlDType::Q4_0));
        assert_eq!(fit(GgmlDType::Q4K, 16), None);
        assert_eq!(fit(GgmlDType::Q8_0, 48), None);
    }
}
