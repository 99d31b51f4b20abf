//! The process heap between the phases of a generation.
//!
//! glibc's allocator raises its thresholds as large blocks are freed (up to 32 MiB for mmap,
//! 64 MiB kept at the top of each arena), so that a phase's freed activations stay resident for
//! the next allocation instead of going back to the system. Within a phase that is what makes
//! the per-operation buffers cheap; across phases it keeps the text encoders' and the
//! transformer's working sets resident through the decode and between runs (85-200 MiB on the
//! bench models, docs/performance.md). Fixing the thresholds low gave the memory back but cost
//! 15-25% of a step; handing back what is free at the phase boundaries keeps both.
//!
//! Blocks above that 32 MiB ceiling (the VAE's activations from 256 x 256 pixels, a step's at
//! 1024 x 1024) would still each be a fresh mapping, faulted in and zeroed page by page and
//! unmapped when freed: 12% of a 512 x 512 bf16 decode. [`keep_large_blocks`] puts them on the
//! heap too, where the next block reuses their pages until the phase ends.

/// Serves every block from the heap (glibc: no block gets a mapping of its own) and trims the
/// heap only when asked ([`return_free_memory`]), so that within a phase a freed large block's
/// pages serve the next one. Process-wide and idempotent; called before a generation on the CPU.
/// Nothing to do on other allocators.
pub fn keep_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters under its lock; blocks already mapped
    // stay valid and are unmapped when freed, as before. Without mappings, an arena whose heap
    // cannot grow falls back to the main arena, and the main arena to a mapping when its break
    // cannot move.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Hands the allocator's free pages back to the system (glibc's `malloc_trim`: free chunks in
/// every arena, not only at the top). Nothing to do on other allocators.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only takes the allocator's locks and releases free pages; it is safe to
    // call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
