//! Intel AMX tiles: eight 16 × 64-byte tile registers and a matrix unit that multiplies them
//! (`tdpbf16ps`: a 16 × 32 bf16 tile times a 32 × 16 one, added into 16 × 16 f32 sums: 8192
//! multiply-adds; one core of a Sapphire Rapids Xeon ran 2.2 TFLOP/s of them, against about 80
//! GFLOP/s with AVX512-BF16). Linux hands the 8 KB of tile state to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once here for the process.
//!
//! The tile instructions are written as inline assembly (Rust has no stable AMX intrinsics);
//! the compiler never allocates tile registers, so their contents persist between `asm!` blocks
//! of one thread. Each user loads a [`TileConfig`] before its first tile instruction and
//! [`ops::release`]s the tiles when done.
//!
//! Invariant: an [`Amx`] exists only once the CPU reported AMX-TILE and AMX-BF16, its tile
//! palette has at least 8 tiles of 16 rows × 64 bytes, and the kernel granted this process the
//! tile state; [`Amx::detect`] is the only way to make one.

use std::sync::OnceLock;

/// Tile registers the kernels use (`tmm0`..`tmm7`).
pub(crate) const TILES: usize = 8;
/// Rows of a full tile.
pub(crate) const ROWS: usize = 16;
/// Bytes in a row of a full tile.
pub(crate) const ROW_BYTES: usize = 64;

/// Proof that this process may run AMX tile instructions with bf16 dot products (see the
/// module invariant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Amx {
    _detected: (),
}

impl Amx {
    /// `Some` when the CPU and the operating system let this process use AMX-BF16; the
    /// request for the tile state is made on the first call.
    pub(crate) fn detect() -> Option<Self> {
        static USABLE: OnceLock<bool> = OnceLock::new();
        USABLE
            .get_or_init(os::request_tile_state)
            .then_some(Self { _detected: () })
    }
}

/// A tile configuration (`ldtilecfg`'s 64-byte operand, palette 1): each tile's rows and bytes
/// per row.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Every tile `ROWS × ROW_BYTES`, except the rows of tiles `short` (a bit per tile), which
    /// get `short_rows`.
    pub(crate) fn new(short: u8, short_rows: usize) -> Self {
        assert!(
            (1..=ROWS).contains(&short_rows),
            "TileConfig: {short_rows} rows"
        );
        let mut config = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..TILES {
            config.bytes_per_row[t] = ROW_BYTES as u16;
            config.rows[t] = if short & (1 << t) != 0 {
                short_rows as u8
            } else {
                ROWS as u8
            };
        }
        config
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod os {
    use std::arch::x86_64::{__cpuid, __cpuid_count};

    use super::{ROW_BYTES, ROWS, TILES};

    /// `arch_prctl` code asking for an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    /// The AMX tile data state component.
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// Whether the CPU has AMX-TILE and AMX-BF16 with a large enough palette, and Linux gave
    /// this process the tile state.
    pub(super) fn request_tile_state() -> bool {
        let (max_leaf, features) = (__cpuid(0).eax, __cpuid_count(7, 0).edx);
        let (amx_bf16, amx_tile) = (features & (1 << 22) != 0, features & (1 << 24) != 0);
        if max_leaf < 0x1d || !amx_bf16 || !amx_tile {
            return false;
        }
        // Leaf 0x1d (checked to exist above), sub-leaf 1: palette 1's tile sizes.
        let palette = __cpuid_count(0x1d, 1);
        let row_bytes = (palette.ebx & 0xffff) as usize;
        let names = (palette.ebx >> 16) as usize;
        let rows = (palette.ecx & 0xffff) as usize;
        if row_bytes < ROW_BYTES || names < TILES || rows < ROWS {
            return false;
        }
        // SAFETY: a plain system call with integer arguments; it changes no memory of ours.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod os {
    /// AMX is used only on x86-64 Linux, where the tile state can be requested.
    pub(super) fn request_tile_state() -> bool {
        false
    }
}

/// The tile instructions. Every function needs [`Amx`]'s invariant and a loaded configuration.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
pub(crate) mod ops {
    use std::arch::asm;

    use super::TileConfig;

    /// Loads `config` into this thread's tile registers (zeroing them).
    ///
    /// # Safety
    /// An [`super::Amx`] must exist.
    #[inline(always)]
    pub(crate) unsafe fn configure(config: &TileConfig) {
        // SAFETY: the caller vouches for AMX; `config` is a valid 64-byte palette-1 config.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config, options(nostack, readonly)) }
    }

    /// Returns the tile registers to their initial state.
    ///
    /// # Safety
    /// An [`super::Amx`] must exist.
    #[inline(always)]
    pub(crate) unsafe fn release() {
        // SAFETY: the caller vouches for AMX.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) }
    }

    // Each function `match`es its constant tile numbers onto one `asm!` per register (the
    // template must name the register), so a call compiles to its one instruction. Sums live
    // in tmm0-3, activations in tmm4-5 and weights in tmm6-7.

    /// Tile `T` = its configured rows from `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// A configuration is loaded, and the configured rows × bytes at `p` are readable.
    #[inline(always)]
    pub(crate) unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
        // SAFETY: as the caller guarantees.
        unsafe {
            match T {
                0 => {
                    asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                1 => {
                    asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                2 => {
                    asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                3 => {
                    asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                4 => {
                    asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                5 => {
                    asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                6 => {
                    asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                7 => {
                    asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
                }
                _ => unreachable!("tile {T} is not one the kernels use"),
            }
        }
    }

    /// Sum tile `T`'s configured rows to `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// A configuration is loaded, and the configured rows × bytes at `p` are writable.
    #[inline(always)]
    pub(crate) unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
        // SAFETY: as the caller guarantees.
        unsafe {
            match T {
                0 => {
                    asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) p, s = in(reg) stride, options(nostack, preserves_flags))
                }
                1 => {
                    asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) p, s = in(reg) stride, options(nostack, preserves_flags))
                }
                2 => {
                    asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) p, s = in(reg) stride, options(nostack, preserves_flags))
                }
                3 => {
                    asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) p, s = in(reg) stride, options(nostack, preserves_flags))
                }
                _ => unreachable!("tile {T} holds no sums"),
            }
        }
    }

    /// Sum tile `T` = 0.
    ///
    /// # Safety
    /// A configuration is loaded.
    #[inline(always)]
    pub(crate) unsafe fn zero<const T: u8>() {
        // SAFETY: as the caller guarantees.
        unsafe {
            match T {
                0 => asm!("tilezero tmm0", options(nostack, nomem, preserves_flags)),
                1 => asm!("tilezero tmm1", options(nostack, nomem, preserves_flags)),
                2 => asm!("tilezero tmm2", options(nostack, nomem, preserves_flags)),
                3 => asm!("tilezero tmm3", options(nostack, nomem, preserves_flags)),
                _ => unreachable!("tile {T} holds no sums"),
            }
        }
    }

    /// Sum tile `C` += activation tile `A` · weight tile `B` (`tdpbf16ps`).
    ///
    /// # Safety
    /// A configuration is loaded with matching shapes.
    #[inline(always)]
    pub(crate) unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: as the caller guarantees.
        unsafe {
            match (C, A, B) {
                (0, 4, 6) => asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (0, 4, 7) => asm!(
                    "tdpbf16ps tmm0, tmm4, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (0, 5, 6) => asm!(
                    "tdpbf16ps tmm0, tmm5, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (0, 5, 7) => asm!(
                    "tdpbf16ps tmm0, tmm5, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (1, 4, 6) => asm!(
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (1, 4, 7) => asm!(
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (1, 5, 6) => asm!(
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (1, 5, 7) => asm!(
                    "tdpbf16ps tmm1, tmm5, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (2, 4, 6) => asm!(
                    "tdpbf16ps tmm2, tmm4, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (2, 4, 7) => asm!(
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (2, 5, 6) => asm!(
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (2, 5, 7) => asm!(
                    "tdpbf16ps tmm2, tmm5, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (3, 4, 6) => asm!(
                    "tdpbf16ps tmm3, tmm4, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (3, 4, 7) => asm!(
                    "tdpbf16ps tmm3, tmm4, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                (3, 5, 6) => asm!(
                    "tdpbf16ps tmm3, tmm5, tmm6",
                    options(nostack, nomem, preserves_flags)
                ),
                (3, 5, 7) => asm!(
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem, preserves_flags)
                ),
                _ => unreachable!("tdpbf16ps tmm{C}, tmm{A}, tmm{B} is not one the kernels use"),
            }
        }
    }
}
