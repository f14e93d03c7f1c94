// RMSNorm, SwiGLU and the split of projections into RoPE-rotated heads (and the merge back), each
// with its backward. Storage is fp32 or bf16 (`T`); arithmetic is fp32. The formulas are those of
// the CPU kernels in worker/src/model/fused.rs, which the tests compare these with.
#pragma once
#include "common.cuh"

// --- RMSNorm: y = x w / sqrt(mean(x^2) + eps) over rows of `d` -----------------------------------

// One warp per row, 8 rows per block of 256 threads.
template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int rows, int d,
                             float eps) {
    int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t at = size_t(row) * d;
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) {
        float v = load(x, at + j);
        ss += v * v;
    }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int j = lane; j < d; j += 32) store(y, at + j, load(x, at + j) * r * load(w, j));
}

// Rows per block of the backward; each block writes its rows' share of the weight gradient to
// `dw_part[block][d]`, which `rms_norm_dw` sums in a fixed order (deterministic, no atomics).
#define RMS_BWD_ROWS 32

// 256 threads. First each warp finds, for its rows, r = 1/rms and c = r^3 sum(g w x) / d; then the
// threads walk the columns: dx = r g w - x c, and dw += g x r over the block's rows.
template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ g,
                             T* __restrict__ dx, float* __restrict__ dw_part, int rows, int d, float eps) {
    __shared__ float r_s[RMS_BWD_ROWS], c_s[RMS_BWD_ROWS];
    const int row0 = blockIdx.x * RMS_BWD_ROWS, lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    const int n = min(RMS_BWD_ROWS, rows - row0);
    for (int i = warp; i < n; i += blockDim.x / 32) {
        const size_t at = size_t(row0 + i) * d;
        float ss = 0.0f, dot = 0.0f;
        for (int j = lane; j < d; j += 32) {
            float v = load(x, at + j);
            ss += v * v;
            dot += load(g, at + j) * load(w, j) * v;
        }
        ss = warp_sum(ss);
        dot = warp_sum(dot);
        if (lane == 0) {
            float r = rsqrtf(ss / d + eps);
            r_s[i] = r;
            c_s[i] = r * r * r * dot / d;
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float wj = load(w, j);
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) {
            const size_t at = size_t(row0 + i) * d + j;
            const float xv = load(x, at), gv = load(g, at), r = r_s[i];
            store(dx, at, r * gv * wj - xv * c_s[i]);
            acc += gv * xv * r;
        }
        dw_part[size_t(blockIdx.x) * d + j] = acc;
    }
}

// dw[j] = sum over parts of dw_part[part][j].
template <typename T>
__device__ void rms_norm_dw(const float* __restrict__ dw_part, T* __restrict__ dw, int parts, int d) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += dw_part[size_t(p) * d + j];
    store(dw, j, acc);
}

// --- SwiGLU: y = silu(a) u ---------------------------------------------------------------------

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + __expf(-a)); }

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ a, const T* __restrict__ u, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float av = load(a, i);
        store(y, i, av * sigmoid(av) * load(u, i));
    }
}

// With s = sigmoid(a): da = g u s (1 + a (1 - s)), du = g a s.
template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ a, const T* __restrict__ u, const T* __restrict__ g,
                           T* __restrict__ da, T* __restrict__ du, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float av = load(a, i), uv = load(u, i), gv = load(g, i), s = sigmoid(av);
        store(da, i, gv * uv * s * (1.0f + av * (1.0f - s)));
        store(du, i, gv * av * s);
    }
}

// --- Heads: rows [batch * seq, heads * hd] <-> heads [batch, heads, seq, hd] ----------------------

// One thread per rotation pair (i, i + hd / 2) of one row of one head. `split` reads rows and writes
// heads, rotating by the position's angle; otherwise it reads heads and writes rows, rotating back
// (the split's gradient, or the merge of attention's output when `cos` is null: no rotation).
template <typename T>
__device__ void heads(const T* __restrict__ src, T* __restrict__ dst, const float* __restrict__ cos,
                      const float* __restrict__ sin, int batch, int seq, int nheads, int hd, int split) {
    const int half = hd / 2;
    const long long total = (long long)batch * seq * nheads * half;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = int(e % half);
        long long rest = e / half;
        const int h = int(rest % nheads);
        rest /= nheads;
        const int t = int(rest % seq);
        const int b = int(rest / seq);
        const size_t row = ((size_t(b) * seq + t) * nheads + h) * hd;
        const size_t head = ((size_t(b) * nheads + h) * seq + t) * hd;
        const size_t from = split ? row : head, to = split ? head : row;
        float x1 = load(src, from + i), x2 = load(src, from + i + half);
        if (cos != nullptr) {
            const float c = cos[size_t(t) * hd + i], s = split ? sin[size_t(t) * hd + i] : -sin[size_t(t) * hd + i];
            const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
            x1 = y1;
            x2 = y2;
        }
        store(dst, to + i, x1);
        store(dst, to + i + half, x2);
    }
}
