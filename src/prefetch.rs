//! Software prefetch: ask for cache lines that a later step of a batch
//! will read, so that the misses of many packets overlap instead of
//! coming one after another (see `engine`'s batch functions). A hint: it
//! never faults and changes no result.

/// Cache line size on the targets tunsec runs on.
pub const LINE: usize = 64;

/// Prefetch the line holding `p` into all cache levels.
#[inline(always)]
pub fn line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: any address is allowed, none faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetch the lines of `len` bytes from `p`.
#[inline(always)]
pub fn bytes<T>(p: *const T, len: usize) {
    let p = p.cast::<u8>();
    let mut off = 0;
    while off < len {
        line(p.wrapping_add(off));
        off += LINE;
    }
    // The last byte's line, when `p` is not line-aligned.
    if len > 0 {
        line(p.wrapping_add(len - 1));
    }
}
