// The kernels' entry points: one `extern "C"` symbol per kernel and storage type (and head size),
// the names `pretrain-kernels` launches them by. nvcc compiles this file to one PTX module; the
// host emulation (emu.cpp) includes it after emu.hpp.
#include "attention.cu"
#include "attention_mma.cu"
#include "elementwise.cu"
#include "loss.cu"
#include "optim.cu"

#define PRETRAIN_TYPES(X) X(f32, float) X(bf16, bf16)

#define ROW_KERNELS(S, T)                                                                                        \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int rows, int d, float eps) {  \
        rms_norm_fwd(x, w, y, rows, d, eps);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_bwd_##S(const T* x, const T* w, const T* g, T* dx, float* dw_part,   \
                                                int rows, int d, float eps) {                                \
        rms_norm_bwd(x, w, g, dx, dw_part, rows, d, eps);                                                    \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_dw_##S(const float* dw_part, T* dw, int parts, int d) {              \
        rms_norm_dw(dw_part, dw, parts, d);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void swiglu_fwd_##S(const T* a, const T* u, T* y, long long n) {                  \
        swiglu_fwd(a, u, y, n);                                                                              \
    }                                                                                                        \
    extern "C" __global__ void swiglu_bwd_##S(const T* a, const T* u, const T* g, T* da, T* du, long long n) { \
        swiglu_bwd(a, u, g, da, du, n);                                                                      \
    }                                                                                                        \
    extern "C" __global__ void heads_##S(const T* src, T* dst, const float* cos, const float* sin, int batch, \
                                         int seq, int nheads, int hd, int split) {                           \
        heads(src, dst, cos, sin, batch, seq, nheads, hd, split);                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024) cross_entropy_fwd_##S(const T* logits, const uint32_t* targets, float* loss,  \
                                                     int rows, int vocab) {                                  \
        cross_entropy_fwd(logits, targets, loss, rows, vocab);                                               \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024) cross_entropy_bwd_##S(const T* logits, const uint32_t* targets,               \
                                                     const float* loss_grad, T* dlogits, int rows, int vocab) { \
        cross_entropy_bwd(logits, targets, loss_grad, dlogits, rows, vocab);                                 \
    }                                                                                                        \
    extern "C" __global__ void attention_delta_##S(const T* o, const T* g, float* delta, int rows, int hd) { \
        attention_delta(o, g, delta, rows, hd);                                                              \
    }                                                                                                        \
    extern "C" __global__ void sum_squares_##S(const T* x, float* sums, long long n) { sum_squares(x, sums, n); }
PRETRAIN_TYPES(ROW_KERNELS)

extern "C" __global__ void adamw_moments_f32(float* mv, const float* g, long long n, float beta1, float beta2) {
    adamw_moments(mv, g, n, beta1, beta2);
}
extern "C" __global__ void adamw_apply_f32(float* p, const float* mv, long long n, float lr, float c1, float c2,
                                           float eps, float decay) {
    adamw_apply(p, mv, n, lr, c1, c2, eps, decay);
}

#define ATTENTION(S, T, HD)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_FWD_ROWS)                                               \
        attention_fwd_##S##_##HD(const T* q, const T* k, const T* v, T* o, float* lse, int heads,            \
                                 int kv_heads, int seq, float scale) {                                       \
        attention_fwd<T, HD>(q, k, v, o, lse, heads, kv_heads, seq, scale);                                  \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(AttBwdKV<HD>::KEYS)                                         \
        attention_bwd_kv_##S##_##HD(const T* q, const T* k, const T* v, const T* g, const float* lse,        \
                                    const float* delta, T* dk, T* dv, int heads, int kv_heads, int seq,      \
                                    float scale) {                                                           \
        attention_bwd_kv<T, HD>(q, k, v, g, lse, delta, dk, dv, heads, kv_heads, seq, scale);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(AttBwdQ<HD>::QUERIES)                                       \
        attention_bwd_q_##S##_##HD(const T* q, const T* k, const T* v, const T* g, const float* lse,         \
                                   const float* delta, T* dq, int heads, int kv_heads, int seq, float scale) { \
        attention_bwd_q<T, HD>(q, k, v, g, lse, delta, dq, heads, kv_heads, seq, scale);                     \
    }
#define ATTENTION_HEADS(S, T) ATTENTION(S, T, 16) ATTENTION(S, T, 32) ATTENTION(S, T, 64) ATTENTION(S, T, 128)
PRETRAIN_TYPES(ATTENTION_HEADS)

// The tensor-core attention (bf16, head size 64), 128 threads per block.
extern "C" __global__ void __launch_bounds__(128)
    attention_fwd_mma_bf16_64(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int heads,
                              int kv_heads, int seq, float scale) {
    attention_fwd_mma(q, k, v, o, lse, heads, kv_heads, seq, scale);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_kv_mma_bf16_64(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,
                                 const float* delta, bf16* dk, bf16* dv, int heads, int kv_heads, int seq,
                                 float scale) {
    attention_bwd_kv_mma(q, k, v, g, lse, delta, dk, dv, heads, kv_heads, seq, scale);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_q_mma_bf16_64(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,
                                const float* delta, bf16* dq, int heads, int kv_heads, int seq, float scale) {
    attention_bwd_q_mma(q, k, v, g, lse, delta, dq, heads, kv_heads, seq, scale);
}

// Every entry point, for the emulation's table.
#define PRETRAIN_KERNEL_NAMES_OF(S)                                                                           \
    X(rms_norm_fwd_##S) X(rms_norm_bwd_##S) X(rms_norm_dw_##S) X(swiglu_fwd_##S) X(swiglu_bwd_##S)           \
    X(heads_##S) X(cross_entropy_fwd_##S) X(cross_entropy_bwd_##S) X(attention_delta_##S) X(sum_squares_##S)   \
    X(attention_fwd_##S##_16) X(attention_fwd_##S##_32) X(attention_fwd_##S##_64) X(attention_fwd_##S##_128) \
    X(attention_bwd_kv_##S##_16) X(attention_bwd_kv_##S##_32) X(attention_bwd_kv_##S##_64)                   \
    X(attention_bwd_kv_##S##_128) X(attention_bwd_q_##S##_16) X(attention_bwd_q_##S##_32)                    \
    X(attention_bwd_q_##S##_64) X(attention_bwd_q_##S##_128)
#define PRETRAIN_KERNEL_NAMES PRETRAIN_KERNEL_NAMES_OF(f32) PRETRAIN_KERNEL_NAMES_OF(bf16) X(adamw_moments_f32) X(adamw_apply_f32) \
    X(attention_fwd_mma_bf16_64) X(attention_bwd_kv_mma_bf16_64) X(attention_bwd_q_mma_bf16_64)
