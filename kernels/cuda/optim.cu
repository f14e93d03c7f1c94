// AdamW over fp32 weights and moments, one pass: the same update as the CPU kernel in
// worker/src/train/optim.rs (decoupled weight decay; bias corrections c1, c2 given by the host).
#pragma once
#include "common.cuh"

// In place, in two passes (each a candle in-place op on the tensor it writes): the moments mv
// ([2, n]: first, then second) from the gradient g, then the weights p from the moments.
__device__ void adamw_moments(float* __restrict__ mv, const float* __restrict__ g, long long n, float beta1,
                              float beta2) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        mv[i] = beta1 * mv[i] + (1.0f - beta1) * gi;
        mv[n + i] = beta2 * mv[n + i] + (1.0f - beta2) * gi * gi;
    }
}

__device__ void adamw_apply(float* __restrict__ p, const float* __restrict__ mv, long long n, float lr, float c1,
                            float c2, float eps, float decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float update = (mv[i] / c1) / (sqrtf(mv[n + i] / c2) + eps);
        p[i] = p[i] * (1.0f - decay) - lr * update;
    }
}

// sums[block] = sum of x^2 over the block's grid-stride share of x (n elements); the host adds the
// partial sums (a fixed order: deterministic).
template <typename T>
__device__ void sum_squares(const T* __restrict__ x, float* __restrict__ sums, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        acc += v * v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) sums[blockIdx.x] = acc;
}
