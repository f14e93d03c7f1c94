// Causal attention with grouped-query heads, forward and backward, tiled with an online softmax
// (FlashAttention's algorithm): no `seq x seq` matrix is ever stored. Storage is fp32 or bf16;
// scores, probabilities and accumulators are fp32. q and o are [batch, heads, seq, HD], k and v
// [batch, kv_heads, seq, HD]; query head h reads key/value head h / (heads / kv_heads).
//
// The forward writes each row's log-sum-exp (`lse`, [batch, heads, seq]) for the backward, which
// recomputes the probabilities in two passes without atomics (so results are deterministic): one
// per key block for dK and dV, summed over the group's query heads, and one per query block for dQ.
// A row `D = rowsum(dO o)` comes first (`attention_delta`).
//
// This version computes on the CUDA cores, one thread per query (or key) row; the head size is a
// template parameter so that a row's accumulators stay in registers.
#pragma once
#include "common.cuh"

// Keys and values k0..k0 + KEYS of one head (at `kbase`) into shared tiles (fp32, zeros past
// `seq`), by all the block's threads.
template <typename T, int HD, int KEYS>
__device__ __forceinline__ void load_kv_tile(float (*ks)[HD], float (*vs)[HD], const T* __restrict__ k,
                                             const T* __restrict__ v, size_t kbase, int k0, int seq) {
    for (int e = threadIdx.x; e < KEYS * HD; e += blockDim.x) {
        const int j = k0 + e / HD;
        const size_t at = kbase + size_t(j) * HD + e % HD;
        ks[e / HD][e % HD] = j < seq ? load(k, at) : 0.0f;
        vs[e / HD][e % HD] = j < seq ? load(v, at) : 0.0f;
    }
}

// Forward: a block of ATT_FWD_ROWS threads, one query row each, walks key tiles of ATT_FWD_KEYS
// below the diagonal of its rows.
#define ATT_FWD_ROWS 64
#define ATT_FWD_KEYS 32

template <typename T, int HD>
__device__ void attention_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              T* __restrict__ o, float* __restrict__ lse, int heads, int kv_heads, int seq,
                              float scale) {
    __shared__ float ks[ATT_FWD_KEYS][HD], vs[ATT_FWD_KEYS][HD];
    // The last query blocks see the most keys: they go first, so that no long block runs alone at the end.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_FWD_ROWS;
    const int h = blockIdx.y, b = blockIdx.z, i = q0 + threadIdx.x;
    const int kvh = h / (heads / kv_heads);
    const size_t qbase = (size_t(b) * heads + h) * seq * HD, kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    const bool live = i < seq;
    float qr[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        qr[d] = live ? load(q, qbase + size_t(i) * HD + d) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int keys = min(seq, q0 + ATT_FWD_ROWS);
    for (int k0 = 0; k0 < keys; k0 += ATT_FWD_KEYS) {
        __syncthreads();
        load_kv_tile<T, HD, ATT_FWD_KEYS>(ks, vs, k, v, kbase, k0, seq);
        __syncthreads();
        if (!live) continue;
        const int n = min(ATT_FWD_KEYS, i - k0 + 1);  // keys of this tile that row i sees
        if (n <= 0) continue;
        float s[ATT_FWD_KEYS];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATT_FWD_KEYS; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; ++d) dot += qr[d] * ks[j][d];
            s[j] = j < n ? dot : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
        }
        const float nm = fmaxf(m, tile_max);
        const float corr = __expf(m - nm);  // 0 on the first tile (m = -inf)
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; ++d) acc[d] *= corr;
#pragma unroll
        for (int j = 0; j < ATT_FWD_KEYS; ++j) {
            const float p = j < n ? __expf(s[j] - nm) : 0.0f;
            l += p;
#pragma unroll
            for (int d = 0; d < HD; ++d) acc[d] += p * vs[j][d];
        }
        m = nm;
    }
    if (!live) return;
    const float inv = 1.0f / l;
#pragma unroll
    for (int d = 0; d < HD; ++d) store(o, qbase + size_t(i) * HD + d, acc[d] * inv);
    lse[(size_t(b) * heads + h) * seq + i] = m + logf(l);
}

// D[row] = sum(dO[row] o[row]) over [rows, hd]; one warp per row, 8 rows per block of 256.
template <typename T>
__device__ void attention_delta(const T* __restrict__ o, const T* __restrict__ g, float* __restrict__ delta,
                                int rows, int hd) {
    const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += load(o, size_t(row) * hd + d) * load(g, size_t(row) * hd + d);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

// dK and dV: a block of 4096 / HD threads, one key row each, with its key and value rows in shared
// memory and its gradients in registers, walks the query tiles at and below its keys for every
// query head of its group.
template <int HD>
struct AttBwdKV {
    static constexpr int KEYS = 4096 / HD;
    static constexpr int QUERIES = 1024 / HD;
};

template <typename T, int HD>
__device__ void attention_bwd_kv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const T* __restrict__ g, const float* __restrict__ lse,
                                 const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv, int heads,
                                 int kv_heads, int seq, float scale) {
    constexpr int KEYS = AttBwdKV<HD>::KEYS, QUERIES = AttBwdKV<HD>::QUERIES;
    // Rows padded by one so that threads reading their own rows hit different banks.
    __shared__ float ks[KEYS][HD + 1], vs[KEYS][HD + 1];
    __shared__ float qs[QUERIES][HD], gs[QUERIES][HD], lse_s[QUERIES], delta_s[QUERIES];
    const int kvh = blockIdx.y, b = blockIdx.z, k0 = blockIdx.x * KEYS, j = k0 + threadIdx.x;
    const int groups = heads / kv_heads;
    const size_t kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    const bool live = j < seq;
    for (int d = 0; d < HD; ++d) {
        ks[threadIdx.x][d] = live ? load(k, kbase + size_t(j) * HD + d) : 0.0f;
        vs[threadIdx.x][d] = live ? load(v, kbase + size_t(j) * HD + d) : 0.0f;
    }
    float dkr[HD], dvr[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) dkr[d] = dvr[d] = 0.0f;
    for (int gi = 0; gi < groups; ++gi) {
        const int h = kvh * groups + gi;
        const size_t qbase = (size_t(b) * heads + h) * seq * HD, rbase = (size_t(b) * heads + h) * seq;
        for (int i0 = (k0 / QUERIES) * QUERIES; i0 < seq; i0 += QUERIES) {
            __syncthreads();
            for (int e = threadIdx.x; e < QUERIES * HD; e += blockDim.x) {
                const int i = i0 + e / HD;
                const size_t at = qbase + size_t(i) * HD + e % HD;
                qs[e / HD][e % HD] = i < seq ? load(q, at) : 0.0f;
                gs[e / HD][e % HD] = i < seq ? load(g, at) : 0.0f;
            }
            for (int e = threadIdx.x; e < QUERIES; e += blockDim.x) {
                const int i = i0 + e;
                lse_s[e] = i < seq ? lse[rbase + i] : 0.0f;
                delta_s[e] = i < seq ? delta[rbase + i] : 0.0f;
            }
            __syncthreads();
            if (!live) continue;
            for (int r = 0; r < QUERIES; ++r) {
                const int i = i0 + r;
                if (i < j || i >= seq) continue;
                float s = 0.0f, dp = 0.0f;
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    s += qs[r][d] * ks[threadIdx.x][d];
                    dp += gs[r][d] * vs[threadIdx.x][d];
                }
                const float p = __expf(s * scale - lse_s[r]);
                const float ds = p * (dp - delta_s[r]) * scale;
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    dvr[d] += p * gs[r][d];
                    dkr[d] += ds * qs[r][d];
                }
            }
        }
    }
    if (!live) return;
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        store(dk, kbase + size_t(j) * HD + d, dkr[d]);
        store(dv, kbase + size_t(j) * HD + d, dvr[d]);
    }
}

// dQ: a block of 4096 / HD threads, one query row each (its output gradient row in shared memory,
// its query and gradient in registers), walks key tiles of 2048 / HD below its diagonal.
template <int HD>
struct AttBwdQ {
    static constexpr int QUERIES = 4096 / HD;
    static constexpr int KEYS = 2048 / HD;
};

template <typename T, int HD>
__device__ void attention_bwd_q(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const T* __restrict__ g, const float* __restrict__ lse,
                                const float* __restrict__ delta, T* __restrict__ dq, int heads, int kv_heads, int seq,
                                float scale) {
    constexpr int QUERIES = AttBwdQ<HD>::QUERIES, KEYS = AttBwdQ<HD>::KEYS;
    __shared__ float gs[QUERIES][HD + 1];
    __shared__ float ks[KEYS][HD], vs[KEYS][HD];
    const int q0 = (gridDim.x - 1 - blockIdx.x) * QUERIES;  // the longest blocks first
    const int h = blockIdx.y, b = blockIdx.z, i = q0 + threadIdx.x;
    const int kvh = h / (heads / kv_heads);
    const size_t qbase = (size_t(b) * heads + h) * seq * HD, kbase = (size_t(b) * kv_heads + kvh) * seq * HD;
    const bool live = i < seq;
    float qr[HD], dqr[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        qr[d] = live ? load(q, qbase + size_t(i) * HD + d) : 0.0f;
        gs[threadIdx.x][d] = live ? load(g, qbase + size_t(i) * HD + d) : 0.0f;
        dqr[d] = 0.0f;
    }
    const float row_lse = live ? lse[(size_t(b) * heads + h) * seq + i] : 0.0f;
    const float row_delta = live ? delta[(size_t(b) * heads + h) * seq + i] : 0.0f;
    const int keys = min(seq, q0 + QUERIES);
    for (int k0 = 0; k0 < keys; k0 += KEYS) {
        __syncthreads();
        load_kv_tile<T, HD, KEYS>(ks, vs, k, v, kbase, k0, seq);
        __syncthreads();
        if (!live) continue;
        const int n = min(KEYS, i - k0 + 1);
        for (int jj = 0; jj < n; ++jj) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; ++d) {
                s += qr[d] * ks[jj][d];
                dp += gs[threadIdx.x][d] * vs[jj][d];
            }
            const float p = __expf(s * scale - row_lse);
            const float ds = p * (dp - row_delta) * scale;
#pragma unroll
            for (int d = 0; d < HD; ++d) dqr[d] += ds * ks[jj][d];
        }
    }
    if (!live) return;
#pragma unroll
    for (int d = 0; d < HD; ++d) store(dq, qbase + size_t(i) * HD + d, dqr[d]);
}
