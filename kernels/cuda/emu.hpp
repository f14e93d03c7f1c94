// The CUDA execution model on the host, for testing the kernels in this folder without a GPU: the
// same sources compile with g++ against this header. Each block runs on its own set of OS threads,
// one per CUDA thread, and blocks run one after another, so `__shared__` (a function-local
// `static` here) is shared by exactly the threads of the running block (launches are serialised
// process-wide, see emu.cpp). `__syncthreads` is a
// barrier over the block and the warp shuffles exchange values through a per-warp slot table with
// barriers on either side. Threads that return early leave the barriers, as exited threads do on a
// GPU.
//
// What it checks: indexing, bounds, reductions, the synchronisation the kernels rely on, and the
// arithmetic (fp32, with bf16 storage rounded to nearest even like the GPU's conversions). What it
// cannot: timing, occupancy, memory coalescing, or races that a GPU's scheduling would expose and
// this one happens not to.
#pragma once

#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

struct Block {
    explicit Block(unsigned threads) : all(threads), slots(threads) {
        for (unsigned w = 0; w * 32 < threads; ++w) {
            warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
        }
    }
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> slots;
};

inline thread_local Block* block = nullptr;

inline unsigned tid() { return threadIdx.x; }

// One shuffle: every lane publishes `v`, then reads lane `src(lane)`'s.
template <typename T, typename F>
T exchange(T v, F src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    unsigned t = tid(), base = t & ~31u, lane = t & 31u;
    std::barrier<>& warp = *block->warps[t / 32];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->slots[t] = bits;
    warp.arrive_and_wait();
    unsigned from = base + (src(lane) & 31u);
    uint64_t got = from < block->slots.size() ? block->slots[from] : bits;
    warp.arrive_and_wait();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

inline std::mutex& atomics() {
    static std::mutex m;
    return m;
}

}  // namespace emu

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[emu::tid() / 32]->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return emu::exchange(v, [mask](unsigned lane) { return lane ^ unsigned(mask); });
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int = 32) {
    return emu::exchange(v, [src](unsigned) { return unsigned(src); });
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return emu::exchange(v, [delta](unsigned lane) { return lane + delta < 32 ? lane + delta : lane; });
}

inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> g(emu::atomics());
    float old = *p;
    *p = old + v;
    return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
using std::isnan;
using std::max;
using std::min;

// bf16 storage, converted like cuda_bf16.h: round to nearest even, NaN stays NaN.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}

// The warp matrix multiply-accumulate API (mma.h's nvcuda::wmma), for 16 x 16 x 16 tiles of bf16
// with fp32 accumulators. Each lane holds the whole tile (the hardware spreads it over the warp in
// a layout the API does not expose, so kernels may not index fragments, and these do not); loads
// read it whole, stores write it from lane 0, and products are fp32.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    float v[rows * cols];  // row-major, whatever the memory layout
};

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float value) {
    for (float& x : f.v) x = value;
}

template <typename Use, int M, int N, int K, typename L>
void load_matrix_sync(fragment<Use, M, N, K, __nv_bfloat16, L>& f, const __nv_bfloat16* p, unsigned ldm) {
    using F = fragment<Use, M, N, K, __nv_bfloat16, L>;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.v[r * F::cols + c] = __bfloat162float(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
    if ((threadIdx.x & 31u) != 0) return;
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * N + c];
}

template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, __nv_bfloat16, LA>& a,
              const fragment<matrix_b, M, N, K, __nv_bfloat16, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int r = 0; r < M; ++r)
        for (int col = 0; col < N; ++col) {
            float acc = c.v[r * N + col];
            for (int k = 0; k < K; ++k) acc += a.v[r * K + k] * b.v[k * N + col];
            out[r * N + col] = acc;
        }
    for (int i = 0; i < M * N; ++i) d.v[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda

namespace emu {

// Runs `kernel(args...)` over `grid` blocks of `threads` threads.
template <typename... A>
void launch(dim3 grid, unsigned threads, void (*kernel)(A...), A... args) {
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                Block b(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        block = &b;
                        threadIdx = uint3{t, 0, 0};
                        blockIdx = uint3{x, y, z};
                        blockDim = dim3{threads, 1, 1};
                        gridDim = grid;
                        kernel(args...);
                        // An exited thread no longer holds the others at a barrier.
                        b.warps[t / 32]->arrive_and_drop();
                        b.all.arrive_and_drop();
                    });
                }
                for (auto& th : pool) th.join();
            }
}

// `kernel`'s arguments from the `void**` table of a cuLaunchKernel-style call.
template <typename... A, std::size_t... I>
void launch_unpacked(dim3 grid, unsigned threads, void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    launch<A...>(grid, threads, kernel, *static_cast<A*>(args[I])...);
}

struct Entry {
    const char* name;
    void (*run)(dim3, unsigned, void**);
};

}  // namespace emu
