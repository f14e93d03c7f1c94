// Cross-entropy over the vocabulary straight from the LM head's logits in their storage type (bf16
// on a GPU): fp32 only per row, in registers, never a fp32 copy of the `[tokens, vocab]` logits.
#pragma once
#include "common.cuh"

// One block per row: loss[row] = logsumexp(x) - x[target], by an online max and sum. A target
// outside the vocabulary gives NaN (not an out-of-bounds read), which the trainer's NaN check stops
// at; the CPU path checks targets by value instead.
template <typename T>
__device__ void cross_entropy_fwd(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                  float* __restrict__ loss, int rows, int vocab) {
    __shared__ float sm[32], ss[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* x = logits + size_t(row) * vocab;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = load(x, j);
        if (v > m) {
            s = s * __expf(m - v) + 1.0f;
            m = v;
        } else {
            // NaN stays NaN here (it is never greater than m); -inf adds nothing, even before any
            // finite value (where v - m would be NaN).
            s += v == -INFINITY ? 0.0f : __expf(v - m);
        }
    }
    block_max_sum(m, s, sm, ss);
    if (threadIdx.x == 0) {
        const uint32_t t = targets[row];
        loss[row] = t < uint32_t(vocab) ? m + logf(s) - load(x, t) : __int_as_float(0x7fc00000);
    }
}

// d logits = g (softmax(x) - onehot(target)) per row, with lse = loss + x[target] from the forward
// (`loss_grad` holds the rows' losses, then their gradients: [2, rows]).
template <typename T>
__device__ void cross_entropy_bwd(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                  const float* __restrict__ loss_grad, T* __restrict__ dlogits, int rows, int vocab) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t at = size_t(row) * vocab;
    const uint32_t t = targets[row];
    const float g = loss_grad[rows + row];
    const float lse = loss_grad[row] + (t < uint32_t(vocab) ? load(logits, at + t) : 0.0f);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = __expf(load(logits, at + j) - lse);
        store(dlogits, at + j, g * p - (uint32_t(j) == t ? g : 0.0f));
    }
}
