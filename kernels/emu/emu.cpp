// The kernels compiled for the host (see ../cuda/emu.hpp), behind one C entry point shaped like
// cuLaunchKernel: the tests of `pretrain-kernels` (feature `emu`) launch them through it.
#define PRETRAIN_EMU
#include "../cuda/emu.hpp"
#include "../cuda/pretrain.cu"

#include <cstring>
#include <mutex>
#include <utility>

namespace {


template <auto Kernel>
struct Runner;

template <typename... A, void (*Kernel)(A...)>
struct Runner<Kernel> {
    static void run(dim3 grid, unsigned threads, void** args) {
        emu::launch_unpacked(grid, threads, Kernel, args, std::index_sequence_for<A...>{});
    }
};

#define X(name) emu::Entry{#name, &Runner<&name>::run},
const emu::Entry kernels[] = {PRETRAIN_KERNEL_NAMES};
#undef X

}  // namespace

// Runs kernel `name` over `gx x gy x gz` blocks of `threads` threads with `args` (pointers to each
// argument, as for cuLaunchKernel). Returns 0, or -1 when there is no kernel of that name.
//
// One launch at a time in the whole process: a kernel's `__shared__` arrays are function-local
// statics here, so two launches of one kernel from two threads (tests run in parallel) would share
// them.
extern "C" int pretrain_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                                   void** args) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    for (const auto& k : kernels) {
        if (std::strcmp(k.name, name) == 0) {
            k.run(dim3{gx, gy, gz}, threads, args);
            return 0;
        }
    }
    return -1;
}
