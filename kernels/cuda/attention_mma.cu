// Causal grouped-query attention on the tensor cores: bf16 storage, head size 64, the same
// algorithm and contract as attention.cu (forward with an online softmax writing each row's
// log-sum-exp; a dK/dV pass per key block and a dQ pass per query block, no atomics), with every
// product a 16 x 16 x 16 warp matrix multiply (wmma) of bf16 into fp32.
//
// Each warp owns 16 rows. Products land in shared memory as fp32; the softmax and the gradient's
// element-wise parts run there (two lanes per row, 16 columns each), and the probabilities go back
// to the tensor cores as bf16, as in FlashAttention-2. Bf16 tiles are padded to 72 values per row so
// that fragment loads do not all hit one bank.
#pragma once
#include "common.cuh"

#ifndef PRETRAIN_EMU
#include <mma.h>
#endif

namespace mma_att {
using namespace nvcuda;
constexpr int HD = 64;       // head size
constexpr int LD = HD + 8;   // row stride of bf16 [rows][HD] tiles
constexpr int WARPS = 4;     // 128 threads per block
constexpr int ROWS = 16 * WARPS;
constexpr int BT = 32;       // columns of a score tile (keys in the forward and dQ, queries in dK/dV)
constexpr int LS = BT + 4;   // row stride of fp32 [16][BT] score tiles
constexpr int LP = BT + 8;   // row stride of bf16 [16][BT] probability tiles
constexpr int LO = HD + 4;   // row stride of fp32 [16][HD] accumulator tiles

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;  // a [col][k] tile
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;   // a [k][col] tile
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// `rows` rows of HD values from `src` (row `first` on) into a bf16 tile, zeros past `seq`: 16 bytes
// (8 values) per load when `src` is 16-byte aligned (tile rows are: LD * 2 = 144 bytes), else one
// value at a time.
__device__ __forceinline__ void stage(bf16* tile, const bf16* __restrict__ src, int first, int rows, int seq) {
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
        constexpr int V = HD / 8;
        for (int e = threadIdx.x; e < rows * V; e += blockDim.x) {
            const int r = e / V, c = (e % V) * 8;
            uint4 v = {0u, 0u, 0u, 0u};
            if (first + r < seq) v = *reinterpret_cast<const uint4*>(src + size_t(first + r) * HD + c);
            *reinterpret_cast<uint4*>(tile + r * LD + c) = v;
        }
        return;
    }
    const bf16 zero = __float2bfloat16(0.0f);
    for (int e = threadIdx.x; e < rows * HD; e += blockDim.x) {
        const int r = e / HD, c = e % HD;
        tile[r * LD + c] = first + r < seq ? src[size_t(first + r) * HD + c] : zero;
    }
}

// Each warp's 16 of the block's ROWS rows of `a` and of `b` (rows `first..` of one head, zeros past
// `seq`) as A fragments, staged one after the other through `staged` (ROWS x LD bf16 of shared
// memory). Synchronises the block.
__device__ __forceinline__ void rows_to_fragments(FragA* fa, FragA* fb, const bf16* __restrict__ a,
                                                  const bf16* __restrict__ b, bf16* staged, int first, int seq) {
    const int warp = threadIdx.x / 32;
    const bf16* src[2] = {a, b};
    FragA* dst[2] = {fa, fb};
    for (int which = 0; which < 2; ++which) {
        if (which > 0) __syncthreads();  // every warp has its fragments of the first
        stage(staged, src[which], first, ROWS, seq);
        __syncthreads();
        for (int kk = 0; kk < HD / 16; ++kk)
            wmma::load_matrix_sync(dst[which][kk], staged + 16 * warp * LD + kk * 16, LD);
    }
}

// out[16][BT] = a (16 x HD, as fragments) times the transpose of `tile` ([BT][HD] bf16), fp32.
__device__ __forceinline__ void times_transposed(float* out, const FragA* a, const bf16* tile) {
    for (int n = 0; n < BT / 16; ++n) {
        Acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < HD / 16; ++kk) {
            FragBT b;
            wmma::load_matrix_sync(b, tile + n * 16 * LD + kk * 16, LD);
            wmma::mma_sync(acc, a[kk], b, acc);
        }
        wmma::store_matrix_sync(out + n * 16, acc, LS, wmma::mem_row_major);
    }
}

// acc[n] (16 x HD) += p (16 x BT bf16, row stride LP) times `tile` ([BT][HD] bf16).
__device__ __forceinline__ void accumulate(Acc* acc, const bf16* p, const bf16* tile) {
    for (int n = 0; n < HD / 16; ++n) {
        for (int kk = 0; kk < BT / 16; ++kk) {
            FragA a;
            FragB b;
            wmma::load_matrix_sync(a, p + kk * 16, LP);
            wmma::load_matrix_sync(b, tile + kk * 16 * LD + n * 16, LD);
            wmma::mma_sync(acc[n], a, b, acc[n]);
        }
    }
}

// Writes a warp's 16 x HD accumulators as bf16 rows `first..` of `dst` (those before `seq`),
// through `scratch` (16 x LO floats of the warp's own).
__device__ __forceinline__ void write_rows(bf16* __restrict__ dst, const Acc* acc, float* scratch, int first, int seq) {
    __syncwarp();
    for (int n = 0; n < HD / 16; ++n) wmma::store_matrix_sync(scratch + n * 16, acc[n], LO, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < 16 * HD; e += 32) {
        const int r = e / HD, c = e % HD;
        if (first + r < seq) dst[size_t(first + r) * HD + c] = __float2bfloat16(scratch[r * LO + c]);
    }
    __syncwarp();
}
}  // namespace mma_att

// Forward: a block of 4 warps takes 64 query rows and walks key tiles of 32 up to its diagonal.
__device__ void attention_fwd_mma(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                  bf16* __restrict__ o, float* __restrict__ lse, int heads, int kv_heads, int seq,
                                  float scale) {
    using namespace mma_att;
    __shared__ __align__(32) bf16 ks[ROWS * LD];  // the block's queries first, then each key tile
    __shared__ __align__(32) bf16 vs[BT * LD];
    __shared__ __align__(32) float ss[WARPS][16 * LS];  // a warp's scores; its bf16 probabilities alias them
    __shared__ __align__(32) float os[WARPS][16 * LO];  // a warp's output accumulators
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, r = lane / 2, half = lane & 1;
    // The last query blocks see the most keys: they go first, so that no long block runs alone at the end.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
    const int h = blockIdx.y, b = blockIdx.z, w0 = q0 + 16 * warp, qi = w0 + r;
    const int kvh = h / (heads / kv_heads);
    const size_t qbase = (size_t(b) * heads + h) * seq * HD, kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    float* s_w = ss[warp];
    bf16* p_w = reinterpret_cast<bf16*>(s_w);
    float* o_w = os[warp];

    stage(ks, q + qbase, q0, ROWS, seq);
    __syncthreads();
    FragA qf[HD / 16];
    for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(qf[kk], ks + 16 * warp * LD + kk * 16, LD);
    for (int e = lane; e < 16 * LO; e += 32) o_w[e] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // row r's running maximum and sum (both lanes of the row keep them)

    const int keys = min(seq, q0 + ROWS);
    for (int k0 = 0; k0 < keys; k0 += BT) {
        __syncthreads();  // every warp is done with the previous tile (and with the staged queries)
        stage(ks, k + kbase, k0, BT, seq);
        stage(vs, v + kbase, k0, BT, seq);
        __syncthreads();
        if (k0 > w0 + 15) continue;  // every key of the tile is after this warp's rows
        times_transposed(s_w, qf, ks);
        __syncwarp();
        float sv[16];
        float tile_max = -INFINITY;
        for (int c = 0; c < 16; ++c) {
            const int key = k0 + half * 16 + c;
            const float x = s_w[r * LS + half * 16 + c] * scale;
            sv[c] = key <= qi && key < seq ? x : -INFINITY;
            tile_max = fmaxf(tile_max, sv[c]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float nm = fmaxf(m, tile_max);
        const float alpha = nm == -INFINITY ? 1.0f : __expf(m - nm);
        float sum = 0.0f;
        for (int c = 0; c < 16; ++c) {
            sv[c] = sv[c] == -INFINITY ? 0.0f : __expf(sv[c] - nm);  // NaN stays NaN
            sum += sv[c];
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = nm;
        __syncwarp();  // every lane has read its scores: the probabilities may overwrite them
        for (int c = 0; c < 16; ++c) p_w[r * LP + half * 16 + c] = __float2bfloat16(sv[c]);
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) o_w[r * LO + c] *= alpha;
        __syncwarp();
        for (int n = 0; n < HD / 16; ++n) {
            Acc acc;
            wmma::load_matrix_sync(acc, o_w + n * 16, LO, wmma::mem_row_major);
            for (int kk = 0; kk < BT / 16; ++kk) {
                FragA a;
                FragB bv;
                wmma::load_matrix_sync(a, p_w + kk * 16, LP);
                wmma::load_matrix_sync(bv, vs + kk * 16 * LD + n * 16, LD);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(o_w + n * 16, acc, LO, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (qi >= seq) return;
    const float inv = 1.0f / l;
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c)
        o[qbase + size_t(qi) * HD + c] = __float2bfloat16(o_w[r * LO + c] * inv);
    if (half == 0) lse[(size_t(b) * heads + h) * seq + qi] = m + logf(l);
}

// dK and dV: a block of 4 warps takes 64 keys and walks the query tiles (32) at and after them, for
// every query head of its group; dK and dV stay in fragments.
__device__ void attention_bwd_kv_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                     const bf16* __restrict__ v, const bf16* __restrict__ g,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     bf16* __restrict__ dk, bf16* __restrict__ dv, int heads, int kv_heads, int seq,
                                     float scale) {
    using namespace mma_att;
    __shared__ __align__(32) bf16 qs[BT * LD];
    __shared__ __align__(32) bf16 gs[BT * LD];
    __shared__ float lse_s[BT], delta_s[BT];
    // Per warp: S^T then P^T (fp32), and dP^T; the block's keys and values are staged here first.
    __shared__ __align__(32) float work[WARPS][2 * 16 * LS];
    __shared__ __align__(32) bf16 pb[WARPS][16 * LP];
    __shared__ __align__(32) bf16 dsb[WARPS][16 * LP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, r = lane / 2, half = lane & 1;
    const int kvh = blockIdx.y, b = blockIdx.z, k0 = blockIdx.x * ROWS, w0 = k0 + 16 * warp, kj = w0 + r;
    const int groups = heads / kv_heads;
    const size_t kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    float* st = work[warp];
    float* dpt = st + 16 * LS;

    FragA kf[HD / 16], vf[HD / 16];
    // ROWS x LD bf16 fits in the work area, which is not in use yet.
    rows_to_fragments(kf, vf, k + kbase, v + kbase, reinterpret_cast<bf16*>(&work[0][0]), k0, seq);
    Acc dka[HD / 16], dva[HD / 16];
    for (int n = 0; n < HD / 16; ++n) {
        wmma::fill_fragment(dka[n], 0.0f);
        wmma::fill_fragment(dva[n], 0.0f);
    }

    for (int gi = 0; gi < groups; ++gi) {
        const int h = kvh * groups + gi;
        const size_t qbase = (size_t(b) * heads + h) * seq * HD, rbase = (size_t(b) * heads + h) * seq;
        for (int i0 = (k0 / BT) * BT; i0 < seq; i0 += BT) {
            __syncthreads();  // the previous tile (or the staged keys and values) is no longer read
            stage(qs, q + qbase, i0, BT, seq);
            stage(gs, g + qbase, i0, BT, seq);
            for (int e = threadIdx.x; e < BT; e += blockDim.x) {
                // Rows past the end: an infinite log-sum-exp makes their probabilities 0.
                lse_s[e] = i0 + e < seq ? lse[rbase + i0 + e] : INFINITY;
                delta_s[e] = i0 + e < seq ? delta[rbase + i0 + e] : 0.0f;
            }
            __syncthreads();
            if (w0 > i0 + BT - 1) continue;  // every query of the tile is before this warp's keys
            times_transposed(st, kf, qs);
            times_transposed(dpt, vf, gs);
            __syncwarp();
            for (int c = 0; c < 16; ++c) {
                const int col = half * 16 + c, qi = i0 + col;
                const float s = st[r * LS + col] * scale;
                const float p = qi >= kj && qi < seq && kj < seq ? __expf(s - lse_s[col]) : 0.0f;
                const float ds = p * (dpt[r * LS + col] - delta_s[col]) * scale;
                pb[warp][r * LP + col] = __float2bfloat16(p);
                dsb[warp][r * LP + col] = __float2bfloat16(ds);
            }
            __syncwarp();
            accumulate(dva, pb[warp], gs);
            accumulate(dka, dsb[warp], qs);
        }
    }
    __syncthreads();  // the work area becomes each warp's output scratch
    write_rows(dk + kbase, dka, st, w0, seq);
    write_rows(dv + kbase, dva, st, w0, seq);
}

// dQ: a block of 4 warps takes 64 query rows and walks key tiles of 32 up to its diagonal.
__device__ void attention_bwd_q_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, const bf16* __restrict__ g,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    bf16* __restrict__ dq, int heads, int kv_heads, int seq, float scale) {
    using namespace mma_att;
    __shared__ __align__(32) bf16 ks[BT * LD];
    __shared__ __align__(32) bf16 vs[BT * LD];
    __shared__ __align__(32) float work[WARPS][2 * 16 * LS];  // per warp: S, then dP
    __shared__ __align__(32) bf16 dsb[WARPS][16 * LP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, r = lane / 2, half = lane & 1;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;  // the longest blocks first, as in the forward
    const int h = blockIdx.y, b = blockIdx.z, w0 = q0 + 16 * warp, qi = w0 + r;
    const int kvh = h / (heads / kv_heads);
    const size_t qbase = (size_t(b) * heads + h) * seq * HD, kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    float* s_w = work[warp];
    float* dp_w = s_w + 16 * LS;

    FragA qf[HD / 16], gf[HD / 16];
    rows_to_fragments(qf, gf, q + qbase, g + qbase, reinterpret_cast<bf16*>(&work[0][0]), q0, seq);
    const size_t row = (size_t(b) * heads + h) * seq + qi;
    const float row_lse = qi < seq ? lse[row] : INFINITY, row_delta = qi < seq ? delta[row] : 0.0f;
    Acc dqa[HD / 16];
    for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(dqa[n], 0.0f);

    const int keys = min(seq, q0 + ROWS);
    for (int k0 = 0; k0 < keys; k0 += BT) {
        __syncthreads();
        stage(ks, k + kbase, k0, BT, seq);
        stage(vs, v + kbase, k0, BT, seq);
        __syncthreads();
        if (k0 > w0 + 15) continue;
        times_transposed(s_w, qf, ks);
        times_transposed(dp_w, gf, vs);
        __syncwarp();
        for (int c = 0; c < 16; ++c) {
            const int col = half * 16 + c, key = k0 + col;
            const float s = s_w[r * LS + col] * scale;
            const float p = key <= qi && key < seq && qi < seq ? __expf(s - row_lse) : 0.0f;
            dsb[warp][r * LP + col] = __float2bfloat16(p * (dp_w[r * LS + col] - row_delta) * scale);
        }
        __syncwarp();
        accumulate(dqa, dsb[warp], ks);
    }
    __syncthreads();
    write_rows(dq + qbase, dqa, s_w, w0, seq);
}
