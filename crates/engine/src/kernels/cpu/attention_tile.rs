//! The flash-attention tile kernel behind CPU paged attention: up to [`MAX_TILE_QUERIES`]
//! consecutive queries of one head against one segment of their sequence's keys, read from the
//! paged pools in place, with the causal ALiBi bias computed from positions in registers and an
//! online softmax (running max `m`, running sum `l`), so nothing of size `queries × keys` and
//! nothing of size `context` is ever allocated. [`merge`] folds the states of consecutive
//! segments; [`finish`] normalises.
//!
//! Pool layout (see `kv::storage`): per block and head, keys transposed as `[head_dim][block]`
//! (the block's keys of one channel are contiguous: one vector load gives `WIDTH` keys) and
//! values as `[block][head_dim]`. Inside a tile the two small products are register-tiled as in
//! `matmul.rs`: `S = Q·Kᵀ` holds one score vector (`WIDTH` keys) per query and key vector, and
//! reads each key vector once for all queries; `O += P·V` holds one output vector per query and reads each value
//! vector once for all queries. 16-bit elements are widened in registers as they are loaded.
//!
//! The definition every path computes, per (query at position `p`, head): keys `0..=p` are cut
//! into segments of [`segment_len`] keys at absolute positions (multiples of it), each segment
//! into tiles at absolute positions (`Vector::KEY_VECTORS` vectors of at most `WIDTH` keys, a
//! vector never crossing a block); a segment's state starts empty and takes its tiles in order,
//! one softmax update (max, rescale, exps) per tile; the scores are
//! `(scale·q)·k_j + slope·(j − p)` with the dot product summed over channels in order; segment
//! states are merged left to right. Everything a query does depends only on its position, its
//! sequence's keys, the block size and the instruction set — never on which other queries share
//! its tile, where its chunk starts, how many threads run, or what else is in the step (masked
//! keys contribute exact zeros, and an extra fully masked tile multiplies by exactly 1). So the
//! output for a (query, head) is bitwise the same whichever path or chunking produced it (up to
//! the sign of an exact zero).
//!
//! Invariant: SIMD code runs only for an [`Isa`] of that kind (and, for f16 pools, once F16C was
//! detected); only `isa::detect_isa` makes one.

use std::ops::Range;

use super::fast_math;
use super::isa::{Isa, IsaKind};
use super::kv_elem::KvElem;
use super::vector::{Portable, Vector};

/// Most queries one pass keeps in registers (one score and one output vector each).
pub(crate) const MAX_TILE_QUERIES: usize = 8;

/// Keys per segment, about: rounded to whole blocks. Its K and V (~256 KiB in f32 at head dim 64)
/// stay in L2 while every query tile of a task passes over them; it is also the unit over which
/// one decode token's keys are split across threads.
const SEGMENT_KEYS: usize = 512;

/// Most key vectors in one tile (see [`Vector::KEY_VECTORS`]).
const MAX_KEY_VECTORS: usize = 2;

/// Output rows are padded to a multiple of this many floats, so vector stores never need a tail.
pub(crate) const ROW_ALIGN: usize = 16;

/// Keys per segment for pools of `block_size`-token blocks: whole blocks, about [`SEGMENT_KEYS`].
pub(crate) fn segment_len(block_size: usize) -> usize {
    block_size * (SEGMENT_KEYS / block_size).max(1)
}

/// `head_dim` rounded up to [`ROW_ALIGN`]: the row stride of accumulators.
pub(crate) fn padded(head_dim: usize) -> usize {
    head_dim.div_ceil(ROW_ALIGN) * ROW_ALIGN
}

/// One head of one layer's paged pools, and the block table of one sequence.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadPools<'a, T> {
    /// The layer's K pool (all blocks, all heads).
    pub(crate) k: &'a [T],
    /// The layer's V pool, same shape.
    pub(crate) v: &'a [T],
    /// Block ids covering the sequence's keys, in order.
    pub(crate) block_table: &'a [u32],
    /// Tokens per block.
    pub(crate) block_size: usize,
    /// Width of a head.
    pub(crate) head_dim: usize,
    /// Elements per block over all heads.
    pub(crate) block_stride: usize,
    /// Where this head starts inside a block.
    pub(crate) head_offset: usize,
    /// The head's ALiBi slope.
    pub(crate) slope: f32,
}

/// Softmax state of one query over some keys: the largest score `m` and the sum `l` of
/// `e^(s − m)`; the matching weighted sum of values lives in a separate row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SoftmaxState {
    /// Largest score seen (−∞ when none).
    pub(crate) m: f32,
    /// Sum of `e^(s − m)` over the keys seen (0 when none).
    pub(crate) l: f32,
}

impl SoftmaxState {
    /// No key seen yet.
    pub(crate) const EMPTY: Self = Self {
        m: f32::NEG_INFINITY,
        l: 0.0,
    };
}

/// Folds the state of the next segment (`part`, `part_acc`) into the running `total`.
pub(crate) fn merge(
    total: &mut SoftmaxState,
    total_acc: &mut [f32],
    part: SoftmaxState,
    part_acc: &[f32],
) {
    if part.l == 0.0 {
        return; // the query sees none of this segment's keys
    }
    if total.l == 0.0 {
        *total = part;
        total_acc.copy_from_slice(part_acc);
        return;
    }
    let m = total.m.max(part.m);
    let (a, b) = (fast_math::exp(total.m - m), fast_math::exp(part.m - m));
    total.l = total.l * a + part.l * b;
    total.m = m;
    for (t, &x) in total_acc.iter_mut().zip(part_acc) {
        *t = *t * a + x * b;
    }
}

/// Writes the attention output `acc / l` into `out` (`head_dim` floats).
pub(crate) fn finish(state: SoftmaxState, acc: &[f32], out: &mut [f32]) {
    let inv = 1.0 / state.l;
    for (o, &x) in out.iter_mut().zip(acc) {
        *o = x * inv;
    }
}

/// Attention state of the queries at positions `first_pos..first_pos + states.len()` (at most
/// [`MAX_TILE_QUERIES`]) over the keys `keys` (one segment, starting at a block boundary) of
/// `pools`, from scratch. `q` holds the queries pre-multiplied by the softmax scale, rows of
/// `head_dim`; `acc` receives the weighted value sums, rows of [`padded`]`(head_dim)`.
pub(crate) fn attend_segment<T: KvElem>(
    isa: Isa,
    pools: &HeadPools<'_, T>,
    q: &[f32],
    first_pos: usize,
    keys: Range<usize>,
    states: &mut [SoftmaxState],
    acc: &mut [f32],
) {
    let (n, hd, bs) = (states.len(), pools.head_dim, pools.block_size);
    if keys.start >= keys.end.min(first_pos + n) {
        states.fill(SoftmaxState::EMPTY); // no query sees any of these keys
        return;
    }
    assert!(n <= MAX_TILE_QUERIES && q.len() >= n * hd && acc.len() >= n * padded(hd));
    assert!(
        keys.start.is_multiple_of(bs),
        "segments start at a block boundary"
    );
    let last_block = keys.end.min(first_pos + n).div_ceil(bs);
    assert!(
        pools.block_table.len() >= last_block,
        "block table too short"
    );
    let block_len = bs * hd;
    let max_block = pools.block_table[keys.start / bs..last_block]
        .iter()
        .max()
        .map_or(0, |&b| b as usize);
    assert!(
        pools.k.len().min(pools.v.len())
            >= max_block * pools.block_stride + pools.head_offset + block_len,
        "block id outside the pool"
    );
    #[cfg(target_arch = "x86_64")]
    let f16c = !T::NEEDS_F16C || is_x86_feature_detected!("f16c");
    let args = (pools, q, first_pos, keys, states, acc);
    match isa.kind() {
        // SAFETY: an `Isa` of this kind exists only once AVX-512F was detected; F16C checked.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx512 if f16c => unsafe { groups_avx512(args) },
        // SAFETY: AVX2 and FMA were detected for this kind; F16C checked just above.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx2Fma if T::NEEDS_F16C && f16c => unsafe { groups_avx2_f16c(args) },
        // SAFETY: AVX2 and FMA were detected for this kind.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx2Fma if !T::NEEDS_F16C => unsafe { groups_avx2(args) },
        // SAFETY: the portable vector needs no instruction set.
        _ => unsafe { groups::<Portable, T>(args) },
    }
}

/// The arguments of [`attend_segment`], once checked.
type Args<'a, 'p, T> = (
    &'a HeadPools<'p, T>,
    &'a [f32],
    usize,
    Range<usize>,
    &'a mut [SoftmaxState],
    &'a mut [f32],
);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn groups_avx512<T: KvElem>(args: Args<'_, '_, T>) {
    // SAFETY: the features are enabled on this function; the sizes were checked.
    unsafe { groups::<super::vector::x86::Avx512, T>(args) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn groups_avx2<T: KvElem>(args: Args<'_, '_, T>) {
    // SAFETY: as above.
    unsafe { groups::<super::vector::x86::Avx2, T>(args) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn groups_avx2_f16c<T: KvElem>(args: Args<'_, '_, T>) {
    // SAFETY: as above.
    unsafe { groups::<super::vector::x86::Avx2, T>(args) }
}

/// Splits the queries into register tiles of 8, 4, 2 and 1.
#[inline(always)]
unsafe fn groups<V: Vector, T: KvElem>(args: Args<'_, '_, T>) {
    let (pools, q, first_pos, keys, states, acc) = args;
    let (hd, stride) = (pools.head_dim, padded(pools.head_dim));
    let mut r = 0;
    // SAFETY (all calls): forwarded from the caller; each group's slices are inside the
    // checked ones.
    unsafe {
        let n = states.len();
        while r < n {
            let (q, pos, k) = (&q[r * hd..], first_pos + r, keys.clone());
            let (st, ac) = (&mut states[r..], &mut acc[r * stride..]);
            r += match n - r {
                8.. => pass::<V, T, 8>(pools, q, pos, k, st, ac),
                4.. => pass::<V, T, 4>(pools, q, pos, k, st, ac),
                2.. => pass::<V, T, 2>(pools, q, pos, k, st, ac),
                _ => pass::<V, T, 1>(pools, q, pos, k, st, ac),
            };
        }
    }
}

/// Loads `lanes` (≤ `V::WIDTH`) elements from `p`, zeros in the other lanes.
#[inline(always)]
unsafe fn load_lanes<V: Vector, T: KvElem>(p: *const T, lanes: usize) -> V {
    // SAFETY: the caller passes `lanes` readable elements.
    unsafe {
        if lanes == V::WIDTH {
            T::load(p)
        } else {
            let mut buf = [T::default(); 16];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), lanes);
            T::load(buf.as_ptr())
        }
    }
}

/// Where a tile's values are: per key vector, the head's value rows in its block, the first
/// key's slot there, the keys any query uses, and the vector's lanes.
struct TileValues<T> {
    rows: [*const T; MAX_KEY_VECTORS],
    at: [usize; MAX_KEY_VECTORS],
    n_keys: [usize; MAX_KEY_VECTORS],
    lanes: [usize; MAX_KEY_VECTORS],
}

/// `O = O·corr + P·V` for one query whose output row is `C` full vectors (`C · WIDTH` =
/// `hd`), all held in registers: keys outer, so the row's `C` sums advance side by side
/// instead of one chunk's chain of dependent FMAs after another. Each element still adds its
/// keys in order, so the bits are those of the chunk-by-chunk loop in [`pass`].
#[inline(always)]
unsafe fn pv_row<V: Vector, T: KvElem, const C: usize>(
    values: &TileValues<T>,
    probs: &[f32],
    corr: f32,
    acc: *mut f32,
    hd: usize,
) {
    let w = V::WIDTH;
    let TileValues {
        rows: vr,
        at,
        n_keys,
        lanes,
    } = values;
    // SAFETY: as in `pass`, which checked the rows: value rows of `hd` elements inside one
    // block, `acc` a row of at least `C · WIDTH` floats.
    unsafe {
        let mut o = [V::splat(0.0); C];
        for (c, oc) in o.iter_mut().enumerate() {
            *oc = V::mul(V::load(acc.add(c * w)), V::splat(corr));
        }
        let mut off = 0;
        for v in 0..V::KEY_VECTORS {
            for jj in 0..n_keys[v] {
                let row = vr[v].add((at[v] + jj) * hd);
                let p = V::splat(probs[off + jj]);
                for (c, oc) in o.iter_mut().enumerate() {
                    *oc = V::fmadd(p, T::load(row.add(c * w)), *oc);
                }
            }
            off += lanes[v];
        }
        for (c, oc) in o.iter().enumerate() {
            oc.store(acc.add(c * w));
        }
    }
}

/// [`pv_row`] for the head widths it is built for (those of the MPT models: 64, 112 and 128 on
/// AVX-512, 64 on AVX2); false, doing nothing, for the others.
#[inline(always)]
unsafe fn pv_row_if_held<V: Vector, T: KvElem>(
    values: &TileValues<T>,
    probs: &[f32],
    corr: f32,
    acc: *mut f32,
    hd: usize,
) -> bool {
    if !hd.is_multiple_of(V::WIDTH) {
        return false;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match hd / V::WIDTH {
            4 => pv_row::<V, T, 4>(values, probs, corr, acc, hd),
            7 => pv_row::<V, T, 7>(values, probs, corr, acc, hd),
            8 => pv_row::<V, T, 8>(values, probs, corr, acc, hd),
            _ => return false,
        }
    }
    true
}

/// One register tile of `RQ` queries over one segment; returns `RQ`.
// Key and query indices address several arrays at once (pools, probabilities, rows).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pass<V: Vector, T: KvElem, const RQ: usize>(
    pools: &HeadPools<'_, T>,
    q: &[f32],
    first_pos: usize,
    keys: Range<usize>,
    states: &mut [SoftmaxState],
    acc: &mut [f32],
) -> usize {
    let (bs, hd, w) = (pools.block_size, pools.head_dim, V::WIDTH);
    let stride = padded(hd);
    let last_pos = first_pos + RQ - 1;
    let end = keys.end.min(last_pos + 1);
    acc[..RQ * stride].fill(0.0);
    let (qp, ap) = (q.as_ptr(), acc.as_mut_ptr());
    // SAFETY: `attend_segment` checked that `q` and `acc` hold `RQ` rows and that every block
    // of the table up to `end` lies inside both pools; loads below stay inside one head's block
    // (`load_lanes` reads at most the lanes that exist) and inside `q`/`acc` rows.
    unsafe {
        let zero = V::splat(0.0);
        let mut m = [f32::NEG_INFINITY; RQ];
        let mut l = [zero; RQ];
        let mut j0 = keys.start;
        while j0 < end {
            // The tile: up to KEY_VECTORS vectors of keys, each inside one block, consecutive.
            // A vector past `end` repeats the first one's data, fully masked (it adds exact
            // zeros), so every query sees the same tiles whatever its neighbours.
            let mut kt = [pools.k.as_ptr(); MAX_KEY_VECTORS];
            let mut vr = [pools.v.as_ptr(); MAX_KEY_VECTORS];
            let mut at = [0usize; MAX_KEY_VECTORS]; // first key's slot in its block
            let mut lanes = [0usize; MAX_KEY_VECTORS];
            let mut first = [0usize; MAX_KEY_VECTORS]; // absolute position of the first key
            let mut j = j0;
            for v in 0..V::KEY_VECTORS {
                if j < end {
                    at[v] = j % bs;
                    lanes[v] = w.min(bs - at[v]);
                    first[v] = j;
                    let block = pools.block_table[j / bs] as usize;
                    let base = block * pools.block_stride + pools.head_offset;
                    (kt[v], vr[v]) = (pools.k.as_ptr().add(base), pools.v.as_ptr().add(base));
                    j += lanes[v];
                } else {
                    (kt[v], vr[v], at[v], lanes[v]) = (kt[0], vr[0], at[0], 0);
                    first[v] = usize::MAX;
                }
            }

            // S = Q·Kᵀ: one vector of keys per query and key vector, channels in order.
            let mut s = [[zero; MAX_KEY_VECTORS]; RQ];
            let mut width = [lanes[0]; MAX_KEY_VECTORS];
            let mut kp = [pools.k.as_ptr(); MAX_KEY_VECTORS];
            for v in 0..V::KEY_VECTORS {
                if lanes[v] > 0 {
                    width[v] = lanes[v];
                }
                kp[v] = kt[v].add(at[v]);
            }
            if width[..V::KEY_VECTORS].iter().all(|&n| n == w) {
                for d in 0..hd {
                    let mut kv = [zero; MAX_KEY_VECTORS];
                    for v in 0..V::KEY_VECTORS {
                        kv[v] = T::load(kp[v].add(d * bs));
                    }
                    for (r, sr) in s.iter_mut().enumerate() {
                        let qv = V::splat(*qp.add(r * hd + d));
                        for v in 0..V::KEY_VECTORS {
                            sr[v] = V::fmadd(qv, kv[v], sr[v]);
                        }
                    }
                }
            } else {
                for d in 0..hd {
                    let mut kv = [zero; MAX_KEY_VECTORS];
                    for v in 0..V::KEY_VECTORS {
                        kv[v] = load_lanes::<V, T>(kp[v].add(d * bs), width[v]);
                    }
                    for (r, sr) in s.iter_mut().enumerate() {
                        let qv = V::splat(*qp.add(r * hd + d));
                        for v in 0..V::KEY_VECTORS {
                            sr[v] = V::fmadd(qv, kv[v], sr[v]);
                        }
                    }
                }
            }

            // ALiBi bias and causal mask from positions, then the online softmax.
            let mut jv = [zero; MAX_KEY_VECTORS];
            let mut last = [-1f32; MAX_KEY_VECTORS]; // last key of each vector (−1: none)
            for v in 0..V::KEY_VECTORS {
                if lanes[v] > 0 {
                    jv[v] = V::add(V::iota(), V::splat(first[v] as f32));
                    last[v] = (first[v] + lanes[v] - 1) as f32;
                }
            }
            let mut probs = [[0f32; 16 * MAX_KEY_VECTORS]; RQ];
            let mut masked = [[zero; MAX_KEY_VECTORS]; RQ];
            let mut limits = [[zero; MAX_KEY_VECTORS]; RQ];
            // Per query `m_old − m_new`, for one vector `exp` of all the rescale factors (the
            // same bits as a scalar `exp` per query); 0 (factor 1) where nothing is visible yet.
            let mut shift = [0f32; 16];
            for r in 0..RQ {
                let pos = (first_pos + r) as f32;
                let mut top = V::splat(f32::NEG_INFINITY);
                for v in 0..V::KEY_VECTORS {
                    limits[r][v] = V::splat(pos.min(last[v]));
                    let rel = V::sub(jv[v], V::splat(pos));
                    let biased = V::fmadd(V::splat(pools.slope), rel, s[r][v]);
                    let minus_inf = V::splat(f32::NEG_INFINITY);
                    masked[r][v] = V::select_le(jv[v], limits[r][v], biased, minus_inf);
                    top = V::max(top, masked[r][v]);
                }
                let m_new = m[r].max(top.reduce_max());
                if m_new != f32::NEG_INFINITY {
                    shift[r] = m[r] - m_new;
                    m[r] = m_new;
                }
            }
            let mut corr = [1f32; 16];
            for c in (0..RQ).step_by(w) {
                V::exp(V::load(shift.as_ptr().add(c))).store(corr.as_mut_ptr().add(c));
            }
            for r in 0..RQ {
                if m[r] == f32::NEG_INFINITY {
                    continue; // no key of this tile (or before it) is visible yet
                }
                let mut lr = V::mul(l[r], V::splat(corr[r]));
                let mut off = 0;
                for v in 0..V::KEY_VECTORS {
                    let e = V::exp(V::sub(masked[r][v], V::splat(m[r])));
                    let p = V::select_le(jv[v], limits[r][v], e, zero);
                    lr = V::add(lr, p);
                    p.store(probs[r].as_mut_ptr().add(off));
                    off += lanes[v];
                }
                l[r] = lr;
            }

            // O = O·corr + P·V over the keys any query of the tile sees, channels `w` at a time.
            let mut n_keys = [0usize; MAX_KEY_VECTORS];
            for v in 0..V::KEY_VECTORS {
                if lanes[v] > 0 {
                    n_keys[v] = lanes[v].min(last_pos + 1 - first[v]);
                }
            }
            // A single query (decode) holds its whole output row in registers, keys outer.
            let values = TileValues {
                rows: vr,
                at,
                n_keys,
                lanes,
            };
            let held = RQ == 1 && pv_row_if_held::<V, T>(&values, &probs[0], corr[0], ap, hd);
            let mut dv = if held { hd } else { 0 };
            while dv < hd {
                let width = w.min(hd - dv);
                let mut o = [zero; RQ];
                for (r, or) in o.iter_mut().enumerate() {
                    *or = V::mul(V::load(ap.add(r * stride + dv)), V::splat(corr[r]));
                }
                let mut off = 0;
                for v in 0..V::KEY_VECTORS {
                    for jj in 0..n_keys[v] {
                        let row = vr[v].add((at[v] + jj) * hd + dv);
                        let vv = if width == w {
                            T::load(row)
                        } else {
                            load_lanes::<V, T>(row, width)
                        };
                        for (r, or) in o.iter_mut().enumerate() {
                            *or = V::fmadd(V::splat(probs[r][off + jj]), vv, *or);
                        }
                    }
                    off += lanes[v];
                }
                for (r, or) in o.iter().enumerate() {
                    or.store(ap.add(r * stride + dv));
                }
                dv += w;
            }
            j0 = j;
        }
        for r in 0..RQ {
            states[r] = SoftmaxState {
                m: m[r],
                l: l[r].reduce_add(),
            };
        }
    }
    RQ
}
