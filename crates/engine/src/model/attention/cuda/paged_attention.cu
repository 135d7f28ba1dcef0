// Paged ALiBi attention for MPT over the tensor KV pools of crates/engine/src/kv/storage.rs.
// Compiled to PTX by crates/engine/build.rs (nvcc --ptx) when the `cuda` feature is on; launched
// from crates/engine/src/model/attention/cuda/launch.rs with the metadata that meta.rs beside it
// packs, as described below.
//
// NOT YET RUN ON A GPU: written and compiled without a card; bench/gpu-check.sh is the first
// check. Until it passes, the engine uses the candle tensor-op path by default.
//
// Layouts (T = __nv_bfloat16, __half or float; H heads, D head dim):
//   q, out       (tokens, H, D), tokens of all sequences back to back (the flattened batch)
//   k/v pool     (num_blocks, block_size, H, D); token `pos` of sequence s lives in block
//                block_tables[table_off[s] + pos / block_size], slot pos % block_size
//   q_start      (S + 1) i32: sequence s owns query rows q_start[s] .. q_start[s+1]
//   ctx_len      (S) i32: context length after this step; the last query is at ctx_len - 1
//   tiles        (2 * num_tiles) i32: (sequence, first local query) of each prefill tile
//   slopes       (H) f32 ALiBi slopes; bias of key j for a query at p is slope * (j - p), j <= p
// Arithmetic: inputs are widened to f32; scores, softmax and accumulation are f32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define THREADS 128
#define WARPS (THREADS / WARP)
// Queries per prefill tile and keys per shared-memory tile (meta.rs mirrors these).
#define PREFILL_BLOCK_M 16
#define PREFILL_BLOCK_N 32
// Keys per decode split (meta.rs mirrors this).
#define DECODE_PARTITION 512

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Block-wide reduction through shared memory; every thread gets the result.
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    x = IS_MAX ? warp_max(x) : warp_sum(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) r = IS_MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

// Element offset of (token position `pos`, head h, dim 0) in a pool.
__device__ __forceinline__ size_t pool_offset(const int* table, int pos, int block_size,
                                              int n_heads, int h, int head_dim) {
    const size_t block = (size_t)table[pos / block_size];
    const size_t slot = block * block_size + pos % block_size;
    return (slot * n_heads + h) * head_dim;
}

// ---------------------------------------------------------------------------------------------
// Prefill (any mix of chunks and decodes). Grid (num_tiles, H), THREADS threads. A tile is up to
// PREFILL_BLOCK_M consecutive queries of one sequence; each warp owns ROWS of them. Keys stream
// through shared memory PREFILL_BLOCK_N at a time, read through the block table (the cached
// prefix and this step's tokens alike), with an online softmax per query row.
template <typename T, int D>
__device__ void paged_prefill(const T* __restrict__ q, const T* __restrict__ k_pool,
                              const T* __restrict__ v_pool, T* __restrict__ out,
                              const int* __restrict__ tiles, const int* __restrict__ q_start,
                              const int* __restrict__ ctx_len, const int* __restrict__ table_off,
                              const int* __restrict__ block_tables,
                              const float* __restrict__ slopes, float scale, int n_heads,
                              int block_size) {
    constexpr int BM = PREFILL_BLOCK_M, BN = PREFILL_BLOCK_N, ROWS = BM / WARPS;
    constexpr int DPL = (D + WARP - 1) / WARP;  // dims per lane
    __shared__ float qs[BM][D];
    __shared__ float ks[BN][D + 1];  // +1: lanes read different rows, same column
    __shared__ float vs[BN][D];

    const int tile = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int s = tiles[2 * tile], m0 = tiles[2 * tile + 1];
    const int row0 = q_start[s], n_q = q_start[s + 1] - row0;
    const int first_pos = ctx_len[s] - n_q;  // position of the sequence's first new token
    const int rows_here = min(BM, n_q - m0);
    const int* table = block_tables + table_off[s];
    const float slope = slopes[h];
    const int kv_end = first_pos + m0 + rows_here;  // keys 0 .. kv_end-1 are visible to someone

    for (int i = threadIdx.x; i < BM * D; i += THREADS) {
        const int r = i / D, d = i % D;
        qs[r][d] = r < rows_here
                       ? to_f32(q[((size_t)(row0 + m0 + r) * n_heads + h) * D + d]) * scale
                       : 0.f;
    }

    float m[ROWS], l[ROWS], acc[ROWS][DPL];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
        m[rr] = -INFINITY;
        l[rr] = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[rr][c] = 0.f;
    }

    for (int kb = 0; kb < kv_end; kb += BN) {
        __syncthreads();  // previous tile fully consumed (and qs written, the first time)
        for (int i = threadIdx.x; i < BN * D; i += THREADS) {
            const int j = i / D, d = i % D, key = kb + j;
            float kx = 0.f, vx = 0.f;
            if (key < kv_end) {
                const size_t off = pool_offset(table, key, block_size, n_heads, h, D) + d;
                kx = to_f32(k_pool[off]);
                vx = to_f32(v_pool[off]);
            }
            ks[j][d] = kx;
            vs[j][d] = vx;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
            const int r = warp * ROWS + rr;
            if (r >= rows_here) break;  // warp-uniform
            const int p = first_pos + m0 + r;
            if (kb > p) continue;  // whole tile after this query (warp-uniform)
            const int key = kb + lane;
            float sc = -INFINITY;
            if (key <= p) {
                float dot = 0.f;
#pragma unroll 8
                for (int d = 0; d < D; ++d) dot += qs[r][d] * ks[lane][d];
                sc = dot + slope * (float)(key - p);
            }
            const float m_new = fmaxf(m[rr], warp_max(sc));  // finite: key kb <= p
            const float alpha = __expf(m[rr] - m_new);          // 0 on the first tile
            const float pl = key <= p ? __expf(sc - m_new) : 0.f;
            l[rr] = l[rr] * alpha + warp_sum(pl);
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[rr][c] *= alpha;
            const int visible = min(BN, p - kb + 1);
            for (int j = 0; j < visible; ++j) {
                const float pj = __shfl_sync(0xffffffffu, pl, j);
#pragma unroll
                for (int c = 0; c < DPL; ++c) {
                    const int d = lane + c * WARP;
                    if (d < D) acc[rr][c] += pj * vs[j][d];
                }
            }
            m[rr] = m_new;
        }
    }

#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
        const int r = warp * ROWS + rr;
        if (r >= rows_here) break;
        const float inv = 1.f / l[rr];
        T* o = out + ((size_t)(row0 + m0 + r) * n_heads + h) * D;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + c * WARP;
            if (d < D) o[d] = from_f32<T>(acc[rr][c] * inv);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode (every sequence has exactly one new token; query row s belongs to sequence s).
// Grid (H, S, splits), THREADS threads: each block handles keys [split * DECODE_PARTITION,
// (split + 1) * DECODE_PARTITION) of one (sequence, head) and writes an unnormalised partial
// output with its max and sum; paged_decode_reduce merges the splits.
template <typename T, int D>
__device__ void paged_decode(const T* __restrict__ q, const T* __restrict__ k_pool,
                             const T* __restrict__ v_pool, float* __restrict__ part_out,
                             float* __restrict__ part_ml, const int* __restrict__ ctx_len,
                             const int* __restrict__ table_off,
                             const int* __restrict__ block_tables,
                             const float* __restrict__ slopes, float scale, int n_heads,
                             int block_size) {
    constexpr int DPL = (D + WARP - 1) / WARP;
    __shared__ float qs[D];
    __shared__ float sc[DECODE_PARTITION];
    __shared__ float scratch[WARPS];
    __shared__ float accs[WARPS][D];

    const int h = blockIdx.x, s = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int len = ctx_len[s], p = len - 1;
    const int k0 = split * DECODE_PARTITION, k1 = min(len, k0 + DECODE_PARTITION);
    const size_t part = ((size_t)s * n_heads + h) * splits + split;
    if (k0 >= len) {  // this split is past the sequence's context: an empty partial
        for (int d = threadIdx.x; d < D; d += THREADS) part_out[part * D + d] = 0.f;
        if (threadIdx.x == 0) {
            part_ml[2 * part] = -INFINITY;
            part_ml[2 * part + 1] = 0.f;
        }
        return;
    }
    const int* table = block_tables + table_off[s];
    const float slope = slopes[h];
    for (int d = threadIdx.x; d < D; d += THREADS)
        qs[d] = to_f32(q[((size_t)s * n_heads + h) * D + d]) * scale;
    __syncthreads();

    // Scores: one warp per key, lanes across the head dim (coalesced rows of the pool).
    for (int key = k0 + warp; key < k1; key += WARPS) {
        const T* kr = k_pool + pool_offset(table, key, block_size, n_heads, h, D);
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + c * WARP;
            if (d < D) dot += qs[d] * to_f32(kr[d]);
        }
        dot = warp_sum(dot);
        if (lane == 0) sc[key - k0] = dot + slope * (float)(key - p);
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < k1 - k0; i += THREADS) mx = fmaxf(mx, sc[i]);
    mx = block_reduce<true>(mx, scratch);
    float sum = 0.f;
    for (int i = threadIdx.x; i < k1 - k0; i += THREADS) {
        const float e = __expf(sc[i] - mx);
        sc[i] = e;
        sum += e;
    }
    sum = block_reduce<false>(sum, scratch);  // its barriers also publish sc[]

    float a[DPL];
#pragma unroll
    for (int c = 0; c < DPL; ++c) a[c] = 0.f;
    for (int key = k0 + warp; key < k1; key += WARPS) {
        const T* vr = v_pool + pool_offset(table, key, block_size, n_heads, h, D);
        const float pj = sc[key - k0];
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + c * WARP;
            if (d < D) a[c] += pj * to_f32(vr[d]);
        }
    }
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = lane + c * WARP;
        if (d < D) accs[warp][d] = a[c];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += THREADS) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) t += accs[w][d];
        part_out[part * D + d] = t;
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = mx;
        part_ml[2 * part + 1] = sum;
    }
}

// Merges the decode splits. Grid (H, S), THREADS threads (looping over D).
template <typename T>
__device__ void paged_decode_reduce(const float* __restrict__ part_out,
                                    const float* __restrict__ part_ml, T* __restrict__ out,
                                    const int* __restrict__ ctx_len, int n_heads, int head_dim,
                                    int splits) {
    const int h = blockIdx.x, s = blockIdx.y;
    const int used = (ctx_len[s] + DECODE_PARTITION - 1) / DECODE_PARTITION;
    const size_t base = ((size_t)s * n_heads + h) * splits;
    float mx = -INFINITY;
    for (int i = 0; i < used; ++i) mx = fmaxf(mx, part_ml[2 * (base + i)]);
    float total = 0.f;
    for (int i = 0; i < used; ++i)
        total += __expf(part_ml[2 * (base + i)] - mx) * part_ml[2 * (base + i) + 1];
    const float inv = 1.f / total;
    for (int d = threadIdx.x; d < head_dim; d += THREADS) {
        float t = 0.f;
        for (int i = 0; i < used; ++i)
            t += __expf(part_ml[2 * (base + i)] - mx) * part_out[(base + i) * head_dim + d];
        out[((size_t)s * n_heads + h) * head_dim + d] = from_f32<T>(t * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: paged_prefill_{f32,f16,bf16}_d{64,112,128}, paged_decode_..., and
// paged_decode_reduce_{f32,f16,bf16}.
#define PREFILL(TYPE, NAME, DIM)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_prefill_##NAME##_d##DIM(          \
        const TYPE* q, const TYPE* k_pool, const TYPE* v_pool, TYPE* out, const int* tiles,       \
        const int* q_start, const int* ctx_len, const int* table_off, const int* block_tables,    \
        const float* slopes, float scale, int n_heads, int block_size) {                          \
        paged_prefill<TYPE, DIM>(q, k_pool, v_pool, out, tiles, q_start, ctx_len, table_off,      \
                                 block_tables, slopes, scale, n_heads, block_size);               \
    }

#define DECODE(TYPE, NAME, DIM)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_##NAME##_d##DIM(           \
        const TYPE* q, const TYPE* k_pool, const TYPE* v_pool, float* part_out, float* part_ml,   \
        const int* ctx_len, const int* table_off, const int* block_tables, const float* slopes,   \
        float scale, int n_heads, int block_size) {                                               \
        paged_decode<TYPE, DIM>(q, k_pool, v_pool, part_out, part_ml, ctx_len, table_off,         \
                                block_tables, slopes, scale, n_heads, block_size);                \
    }

#define REDUCE(TYPE, NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_reduce_##NAME(             \
        const float* part_out, const float* part_ml, TYPE* out, const int* ctx_len, int n_heads,  \
        int head_dim, int splits) {                                                               \
        paged_decode_reduce<TYPE>(part_out, part_ml, out, ctx_len, n_heads, head_dim, splits);    \
    }

#define ALL_DIMS(TYPE, NAME)                                                                      \
    PREFILL(TYPE, NAME, 64)                                                                       \
    PREFILL(TYPE, NAME, 112)                                                                      \
    PREFILL(TYPE, NAME, 128)                                                                      \
    DECODE(TYPE, NAME, 64)                                                                        \
    DECODE(TYPE, NAME, 112)                                                                       \
    DECODE(TYPE, NAME, 128)                                                                       \
    REDUCE(TYPE, NAME)

ALL_DIMS(float, f32)
ALL_DIMS(__half, f16)
ALL_DIMS(__nv_bfloat16, bf16)
