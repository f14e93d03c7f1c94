// What every kernel shares: storage types (fp32 or bf16, always computed in fp32), and warp and
// block reductions.
#pragma once

#ifndef PRETRAIN_EMU
#include <cuda_bf16.h>
#include <cstdint>
#endif

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// The sum of `v` over the block (`blockDim.x` a multiple of 32, at most 1024), returned to every
// thread. `scratch` holds 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// The running maximum and rescaled sum of exponentials of two parts, merged (an online softmax's
// step): `(m, s)` stands for `s = sum(e^(x - m))`.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
    float nm = fmaxf(m, m2);
    if (nm == -INFINITY) {  // no finite value in either part: only NaN can be in the sums
        s += s2;
        return;
    }
    s = s * __expf(m - nm) + s2 * __expf(m2 - nm);
    m = nm;
}

__device__ __forceinline__ void block_max_sum(float& m, float& s, float* scratch_m, float* scratch_s) {
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int k = 16; k > 0; k >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, k), s2 = __shfl_xor_sync(0xffffffffu, s, k);
        merge_max_sum(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) {
        scratch_m[warp] = m;
        scratch_s[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? scratch_m[lane] : -INFINITY;
    s = lane < warps ? scratch_s[lane] : 0.0f;
    for (int k = 16; k > 0; k >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, k), s2 = __shfl_xor_sync(0xffffffffu, s, k);
        merge_max_sum(m, s, m2, s2);
    }
}
