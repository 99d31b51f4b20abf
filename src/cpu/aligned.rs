//! A zero-initialised buffer aligned to a cache line (64 bytes), for the operands of the CPU
//! kernels: a 64-byte vector or tile row read from an unaligned address spans two cache lines.
//! Buffers of 4 MiB and more are aligned to 2 MiB and, on Linux, mapped straight from the system
//! (fresh anonymous pages, which are zeros: nothing clears them again, and the kernel zeroes each
//! page when it is first written, so in the threads that fill the buffer rather than in one
//! `memset` first) and asked to be backed by huge pages (packed weights: fewer page faults when
//! they are written at load, fewer TLB misses when they are streamed through the products).

use half::bf16;
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN: usize = 64;
const HUGE: usize = 2 << 20;

/// Element types whose all-zero bit pattern is a valid value (zero).
///
/// # Safety
/// Implementors must be plain data for which every byte being 0 is a valid value: `Aligned` hands
/// out zero-filled memory as `T`.
pub unsafe trait Zeroed: Copy + Send + Sync + 'static {}
// SAFETY: 0.0f32 is all-zero bits.
unsafe impl Zeroed for f32 {}
// SAFETY: bf16 zero is all-zero bits.
unsafe impl Zeroed for bf16 {}
// SAFETY: 0u8 is all-zero bits.
unsafe impl Zeroed for u8 {}
// SAFETY: 0u32 is all-zero bits.
unsafe impl Zeroed for u32 {}

/// `len` elements on a 64-byte boundary (the allocation holds `cap` >= `len`).
pub struct Aligned<T: Zeroed> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer is owned and uniquely pointed to, like a Vec<T>, and T is Send + Sync.
unsafe impl<T: Zeroed> Send for Aligned<T> {}
// SAFETY: shared access only reads (`Deref`), like &Vec<T>; T is Sync.
unsafe impl<T: Zeroed> Sync for Aligned<T> {}

impl<T: Zeroed> Aligned<T> {
    /// An empty buffer (no allocation).
    pub const fn new() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self::new();
        }
        let layout = Self::layout(len);
        let ptr = if layout.size() >= 2 * HUGE {
            huge::zeroed(layout)
        } else {
            // SAFETY: the layout has a non-zero size; all-zero bits are a valid T (`Zeroed`).
            unsafe { alloc_zeroed(layout) }
        } as *mut T;
        let ptr = NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(layout));
        Self { ptr, len, cap: len }
    }

    fn layout(len: usize) -> Layout {
        let l = Layout::array::<T>(len).expect("buffer size overflows");
        let align = if l.size() >= 2 * HUGE { HUGE } else { ALIGN };
        l.align_to(align).expect("buffer size overflows")
    }

    /// Makes the buffer `len` long without clearing it, reusing the allocation when it is large
    /// enough: what it held stays (zeros where nothing was written), for a caller that writes
    /// every value it reads.
    pub fn resize(&mut self, len: usize) {
        if len <= self.cap {
            // (Every element up to `cap` is initialised: zeroed at allocation, then written.)
            self.len = len;
        } else {
            *self = Self::zeroed(len);
        }
    }

    /// Makes the buffer `len` zeros, reusing the allocation when it is large enough.
    pub fn reset(&mut self, len: usize) {
        if len <= self.cap {
            self.len = len;
            // SAFETY: `len` <= `cap` elements are allocated; zero bytes are valid zeros.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, len) };
        } else {
            *self = Self::zeroed(len);
        }
    }
}

/// Zeroed allocations of 4 MiB and more, 2 MiB-aligned.
#[cfg(target_os = "linux")]
mod huge {
    use super::HUGE;
    use std::alloc::Layout;

    /// `layout.size()` zero bytes at a 2 MiB boundary, or null: an anonymous mapping of the size
    /// plus 2 MiB, the unaligned head and the tail beyond the size unmapped, the rest asked to be
    /// backed by transparent huge pages (a hint only).
    pub(super) fn zeroed(layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        debug_assert!(align <= HUGE && size > 0);
        let Some(len) = size.checked_add(HUGE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a new private anonymous mapping; it aliases nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE);
        let end = base + len;
        // SAFETY: [base, start) and [start + size, end) lie in the mapping just made and nothing
        // points into them; what is left, [start, start + size), is `size` bytes at a 2 MiB
        // boundary. munmap and madvise(MADV_HUGEPAGE) leave its contents (zeros) as they are.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            if end > start + size {
                libc::munmap((start + size) as *mut libc::c_void, end - start - size);
            }
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        start as *mut u8
    }

    /// # Safety
    /// `p` came from [`zeroed`] with this layout and is not used after.
    pub(super) unsafe fn free(p: *mut u8, layout: Layout) {
        // SAFETY: [p, p + size) is what `zeroed` left mapped (# Safety).
        unsafe { libc::munmap(p as *mut libc::c_void, layout.size()) };
    }
}

/// Zeroed allocations of 4 MiB and more, 2 MiB-aligned: the global allocator's, cleared.
#[cfg(not(target_os = "linux"))]
mod huge {
    use std::alloc::{alloc, dealloc, Layout};

    pub(super) fn zeroed(layout: Layout) -> *mut u8 {
        // SAFETY: the layout has a non-zero size (callers allocate 4 MiB and more).
        let p = unsafe { alloc(layout) };
        if !p.is_null() {
            // SAFETY: `p` holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    /// # Safety
    /// `p` came from [`zeroed`] with this layout and is not used after.
    pub(super) unsafe fn free(p: *mut u8, layout: Layout) {
        // SAFETY: allocated by `alloc` with this layout (# Safety).
        unsafe { dealloc(p, layout) };
    }
}

impl<T: Zeroed> Default for Aligned<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Zeroed> Drop for Aligned<T> {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        let layout = Self::layout(self.cap);
        let p = self.ptr.as_ptr() as *mut u8;
        if layout.size() >= 2 * HUGE {
            // SAFETY: allocated by `huge::zeroed` with this layout (`zeroed` takes that path for
            // every layout of this size), and not used after this.
            unsafe { huge::free(p, layout) };
        } else {
            // SAFETY: allocated by `alloc_zeroed` with this layout.
            unsafe { dealloc(p, layout) };
        }
    }
}

impl<T: Zeroed> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised elements (or a dangling pointer with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroed> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroed> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.len);
        c.copy_from_slice(self);
        c
    }
}

impl<T: Zeroed> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_reusable() {
        let mut a = Aligned::<f32>::zeroed(1000);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert!(a.iter().all(|&v| v == 0.0));
        a[999] = 3.0;
        let p = a.as_ptr();
        a.reset(500);
        assert_eq!((a.len(), a.as_ptr()), (500, p));
        a[499] = 1.0;
        a.reset(1000);
        assert!(a.iter().all(|&v| v == 0.0));
        a[7] = 2.0;
        a.resize(10);
        assert_eq!(
            (a.len(), a.as_ptr(), a[7]),
            (10, p, 2.0),
            "resize keeps values"
        );
        a.resize(1000);
        assert_eq!(a[7], 2.0);
        a.reset(5000);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let big = Aligned::<f32>::zeroed(3 << 20);
        assert_eq!(big.as_ptr() as usize % HUGE, 0);
        assert!(big.iter().all(|&v| v == 0.0));
        assert_eq!(a.clone().len(), 5000);
        assert!(Aligned::<bf16>::new().is_empty());
    }
}
