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
//! Blocks above that 32 MiB ceiling (the VAE's activations from 256 x 256 pixels up, flux's fused
//! projections at 512 x 512) would still each be a fresh mapping, faulted in and zeroed page by
//! page and unmapped when freed: 12% of a 512 x 512 bf16 decode. And within the sampling loop the
//! 64 MiB kept at the top was too little: a step frees more than that at once (a joint block's
//! projections, joined heads and attention output), glibc trimmed it, and the next step's blocks
//! were fresh pages again (about 10 000 page faults a step on sd3-bench at 512 x 512, 4-7% of a
//! bf16 step). While a [`LargeBlocks`] guard lives (the sampling loop, the VAE's passes) every block
//! comes from the heap and nothing is trimmed, so the next block reuses the freed pages (flux-bench
//! bf16 at 512 x 512: 950 000 -> 590 000 faults in an 8-step run, 5-9% of a step). Only there: in
//! the text phase the heap's holes, which a mapping would not leave, added up to 80 MiB to a run's
//! peak; in sampling they cost 0-19 MiB on the bench models at 512 x 512 in bf16.

use std::sync::Mutex;

/// While alive, the allocator serves every block from the heap (glibc: no block gets a mapping of
/// its own) and trims the heap only when asked ([`return_free_memory`]), so that a freed block's
/// pages serve the next one. Process-wide: when the last guard is dropped, large blocks get
/// mappings again, with glibc's thresholds at the ceilings its own adjustment reaches (32 MiB for
/// a mapping, 64 MiB kept at the top). Nothing to do on other allocators.
#[must_use = "large blocks stay on the heap only while the guard lives"]
pub struct LargeBlocks(());

impl LargeBlocks {
    /// Large blocks on the heap until the guard (and every other) is dropped.
    pub fn keep() -> Self {
        update(|n| *n += 1);
        Self(())
    }
}

impl Drop for LargeBlocks {
    fn drop(&mut self) {
        update(|n| *n = n.saturating_sub(1));
    }
}

/// Guards alive.
static HOLDERS: Mutex<usize> = Mutex::new(0);

/// Changes the guard count and sets glibc's parameters for it.
fn update(change: impl FnOnce(&mut usize)) {
    let mut n = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
    change(&mut n);
    match *n {
        1.. => set(0, i32::MAX, None),
        // glibc's default count of mappings, and the thresholds its adjustment reaches.
        0 => set(65_536, 64 << 20, Some(32 << 20)),
    }
}

/// glibc's mapping count limit, trim threshold and (when given) mapping threshold.
#[cfg_attr(
    not(all(target_os = "linux", target_env = "gnu")),
    allow(unused_variables)
)]
fn set(mmap_max: i32, trim: i32, mmap_threshold: Option<i32>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters under its lock. Blocks already mapped
    // stay valid and are unmapped when freed, as before; without mappings an arena whose heap
    // cannot grow falls back to the main arena, and the main arena to a mapping when its break
    // cannot move.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, mmap_max);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
        if let Some(t) = mmap_threshold {
            libc::mallopt(libc::M_MMAP_THRESHOLD, t);
        }
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
