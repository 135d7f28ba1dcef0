//! Which SIMD instruction set the CPU kernels run with, detected once at run time (the crate
//! itself targets baseline x86-64).
//!
//! Invariant: an [`Isa`] of a SIMD kind exists only once that instruction set was detected on
//! this CPU: [`detect_isa`] and [`Isa::all_supported`] are the only ways to make one, so safe
//! code cannot run AVX-512 on a CPU without it.

/// The instruction-set families the kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IsaKind {
    /// 512-bit vectors, 32 registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 256-bit vectors with FMA, 16 registers.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// Anything else: plain Rust, left to the autovectoriser.
    Portable,
}

/// An instruction set this CPU was checked to support (see the module invariant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Isa(IsaKind);

impl Isa {
    /// Which family it is.
    pub(crate) fn kind(self) -> IsaKind {
        self.0
    }

    /// Every instruction set this CPU supports, portable first (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Isa> {
        let mut all = vec![Isa(IsaKind::Portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Isa(IsaKind::Avx2Fma));
            }
            if is_x86_feature_detected!("avx512f") {
                all.push(Isa(IsaKind::Avx512));
            }
        }
        all
    }
}

/// The best instruction set this CPU supports.
pub(crate) fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa(IsaKind::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa(IsaKind::Avx2Fma);
        }
    }
    Isa(IsaKind::Portable)
}

/// Runs `f` compiled for `isa`: `f` is inlined into a function with that instruction set
/// enabled, so the compiler vectorises its loops with it.
#[inline(always)]
pub(crate) fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    match isa.0 {
        // SAFETY: an `Isa` of this kind exists only once AVX-512F was detected at run time.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx512 => unsafe { call_avx512(f) },
        // SAFETY: an `Isa` of this kind exists only once AVX2 and FMA were detected.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx2Fma => unsafe { call_avx2(f) },
        IsaKind::Portable => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn call_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn call_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
