//! Cache hints for the matmul kernels, which stream each weight once per call and fetch the
//! next tile's weights while the current one computes.

/// Bytes in a cache line.
pub(crate) const LINE: usize = 64;

/// Hints the cache to bring the line at `p` into L2; never faults, so `p` may be past the end.
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint that never dereferences or faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Part `part` of `parts` equal, whole-line shares of the `bytes` bytes from `p`, into L2: a
/// kernel that passes several times over a group of weight rows fetches the next group a share
/// per pass.
#[inline(always)]
pub(crate) fn prefetch_l2_share(p: *const u8, bytes: usize, parts: usize, part: usize) {
    let share = bytes.div_ceil(parts.max(1)).next_multiple_of(LINE);
    prefetch_l2_range(p.wrapping_add(part * share), share);
}

/// [`prefetch_l2`] for every line of the `bytes` bytes from `p`.
#[inline(always)]
pub(crate) fn prefetch_l2_range(p: *const u8, bytes: usize) {
    let mut offset = 0;
    while offset < bytes {
        prefetch_l2(p.wrapping_add(offset));
        offset += LINE;
    }
}
