//! The element types a CPU KV cache can store (f32, IEEE f16, bfloat16) and their scalar
//! conversions. Writes convert once per token; the attention kernels widen 16-bit elements to
//! f32 in registers as they load them (`vector.rs`), so no whole-pool conversion ever happens.
//!
//! Invariants: conversion from f32 rounds to nearest even; f16 saturates at ±65504 instead of
//! overflowing to infinity (an infinite key or value would turn the kernels' exact zero weights
//! for masked keys into NaN), and NaN stays NaN.

use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};

use super::vector::Vector;

/// An element of a CPU KV pool.
pub(crate) trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Whether the x86 vector loads of this type need F16C.
    const NEEDS_F16C: bool = false;
    /// `x` rounded to this type.
    fn from_f32(x: f32) -> Self;
    /// `src` rounded into `dst` (the same length), as [`KvElem::from_f32`] rounds each value.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(x);
        }
    }
    /// `len` zeros (allocated zeroed; the KV pools then write them once to make them resident).
    fn zeros(len: usize) -> Vec<Self>;
    /// `V::WIDTH` elements from `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must point to `V::WIDTH` readable elements, and the CPU must support `V`'s
    /// instruction set.
    unsafe fn load<V: Vector>(p: *const Self) -> V;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn zeros(len: usize) -> Vec<Self> {
        vec![0.0; len]
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const Self) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::load(p) }
    }
}

impl KvElem for f16 {
    const NEEDS_F16C: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x.clamp(-65504.0, 65504.0))
    }
    /// Through `half`'s slice conversion, which uses F16C where the CPU has it (8 values an
    /// instruction): one value at a time, the cache writes took ~5 % of a 512-token prefill.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        const CHUNK: usize = 64;
        let mut clamped = [0f32; CHUNK];
        for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
            for (c, &x) in clamped.iter_mut().zip(s) {
                *c = x.clamp(-65504.0, 65504.0);
            }
            d.convert_from_f32_slice(&clamped[..d.len()]);
        }
    }
    fn zeros(len: usize) -> Vec<Self> {
        vec![0u16; len].reinterpret_into()
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const Self) -> V {
        // SAFETY: forwarded from the caller; f16 is a transparent u16.
        unsafe { V::load_f16(p.cast()) }
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn zeros(len: usize) -> Vec<Self> {
        vec![0u16; len].reinterpret_into()
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const Self) -> V {
        // SAFETY: forwarded from the caller; bf16 is a transparent u16.
        unsafe { V::load_bf16(p.cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_and_saturate() {
        assert_eq!(f16::from_f32(1e6_f32).to_f32(), f16::INFINITY.to_f32());
        assert_eq!(<f16 as KvElem>::from_f32(1e6).to_f32(), 65504.0);
        assert_eq!(<f16 as KvElem>::from_f32(-1e6).to_f32(), -65504.0);
        assert!(<f16 as KvElem>::from_f32(f32::NAN).to_f32().is_nan());
        // 1 + 2^-11 is halfway between two f16 values: ties go to even (1.0).
        assert_eq!(
            <f16 as KvElem>::from_f32(1.0 + 2f32.powi(-11)).to_f32(),
            1.0
        );
        // bf16 keeps 8 bits of mantissa: 1 + 2^-8 is a tie, rounded to even (1.0).
        assert_eq!(
            <bf16 as KvElem>::from_f32(1.0 + 2f32.powi(-8)).to_f32(),
            1.0
        );
        assert_eq!(
            <bf16 as KvElem>::from_f32(3.0e38).to_f32(),
            bf16::from_f32(3.0e38).to_f32()
        );
        let values: Vec<f32> = (0..150)
            .map(|i| match i {
                0 => f32::NAN,
                1 => 1e6,
                2 => -7e4,
                3 => 1.0 + 2f32.powi(-11),
                _ => (i as f32 - 75.0) * 0.377,
            })
            .collect();
        let mut f16s = vec![f16::ZERO; values.len()];
        <f16 as KvElem>::from_f32_slice(&values, &mut f16s);
        for (&x, got) in values.iter().zip(&f16s) {
            let want = <f16 as KvElem>::from_f32(x);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
        }
        for x in [0.0f32, -2.5, 0.333, 1234.5] {
            assert!((<f16 as KvElem>::from_f32(x).to_f32() - x).abs() <= x.abs() * 1e-3);
            assert!((<bf16 as KvElem>::from_f32(x).to_f32() - x).abs() <= x.abs() * 8e-3);
        }
    }
}
