//! The process heap between the phases of a generation.
//!
//! glibc's allocator raises its thresholds as large blocks are freed (up to 32 MiB for mmap,
//! 64 MiB kept at the top of each arena), so that a phase's freed activations stay resident for
//! the next allocation instead of going back to the system. Within a phase that is what makes
//! the per-operation buffers cheap; across phases it keeps the text encoders' and the
//! transformer's working sets resident through the decode and between runs (85-200 MiB on the
//! bench models, docs/performance.md). Fixing the thresholds low gave the memory back but cost
//! 15-25% of a step; handing back what is free at the phase boundaries keeps both.

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
