//! CPU kernels that candle lacks: AMX bf16 matrix products and attention.

pub mod amx;
pub mod attention;

use candle_core::{CpuStorage, Result, Storage, Tensor};
use half::bf16;

/// Calls `f` with the elements of a bf16 CPU tensor in row-major order (copying only if the tensor
/// is not contiguous).
pub fn with_bf16_slice<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::BF16(data)) => {
            let start = layout.start_offset();
            Ok(f(&data[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!(
            "expected a bf16 CPU tensor, got {:?} on {:?}",
            t.dtype(),
            t.device()
        ),
    }
}
