#!/usr/bin/env bash
# The GPU build on a machine without a CUDA install: the CUDA 13.0 toolkit (nvcc, cuBLAS, cuRAND,
# NVRTC, runtime) and NCCL 2.28 from their PyPI wheels, plus a link-only libcuda stub (the real one
# comes with the driver). The toolkit is cached outside the checkout, so it is downloaded once.
#
#   scripts/cuda-toolkit.sh toolkit    prepare the toolkit only
#   scripts/cuda-toolkit.sh check      type-check and lint the worker with --features nccl, with
#                                      candle's CUDA kernels stubbed out (CI runs it: minutes, not
#                                      the half hour the kernels take to compile)
#   scripts/cuda-toolkit.sh build      release-build pretrain-worker, bench-train and check-kernels with NCCL, then
#                                      strip and gzip them into dist/gpu/ (about 20 MiB: small enough
#                                      to copy to a GPU machine)
#
# PRETRAIN_CUDA_TOOLKIT (default ~/.cache/pretrain/cuda-13.0) is where the toolkit lives;
# PRETRAIN_CUDA_TARGET (default ~/.cache/pretrain/target-cuda) is the cargo target folder of the
# release GPU build, kept apart from target/ so its binaries never replace the CPU ones;
# PRETRAIN_CUDA_CHECK_TARGET (default ~/.cache/pretrain/target-cuda-check) that of `check`. Set
# CUDA_COMPUTE_CAP for another GPU generation (default 90: H100/H200). candle's kernels compile with
# nvcc on the first build (about 30 minutes on 2 cores); later builds reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
root=${PRETRAIN_CUDA_TOOLKIT:-$HOME/.cache/pretrain/cuda-13.0}
target=${PRETRAIN_CUDA_TARGET:-$HOME/.cache/pretrain/target-cuda}

if [ ! -e "$root/.complete" ]; then
    echo "preparing the CUDA 13.0 toolkit in $root"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # Pin 13.0: PTX from a newer nvcc does not load on a 13.0 driver. Pin NCCL to the clusters' 2.28.
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp/wheels" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-curand==10.4.*" "nvidia-nccl-cu13==2.28.*"
    for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tmp/tree"; done
    rm -rf "$root" && mkdir -p "$(dirname "$root")"
    mv "$tmp/tree/nvidia/cu13" "$root"
    cp -r "$tmp/tree/nvidia/nccl/include/." "$root/include/"
    cp -r "$tmp/tree/nvidia/nccl/lib/." "$root/lib/"
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    (cd "$root/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done &&
        ln -sf libcurand.so.10 libcurand.so && ln -sf libnccl.so.2 libnccl.so)
    ln -sfn lib "$root/lib64"
    # libcuda comes with the driver; link against a stub that exports the driver API's names.
    cargo fetch --quiet --locked
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19*/ | tail -1)
    grep -rhoE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/" | sed -E 's/pub (unsafe )?fn //' | sort -u |
        sed 's/.*/void &(void) {}/' > "$tmp/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$tmp/stub.c"
    touch "$root/.complete"
fi

export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root" NVCC="$root/bin/nvcc" PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib" LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

case "$mode" in
toolkit)
    echo "toolkit ready in $root"
    ;;
check)
    # Type-check only: candle's kernels are stubbed (scripts/nvcc-typecheck), in a target folder of
    # their own so that no build that runs can pick the empty kernels up.
    cp scripts/nvcc-typecheck "$root/bin/nvcc-typecheck"
    export NVCC="$root/bin/nvcc-typecheck" CARGO_TARGET_DIR=${PRETRAIN_CUDA_CHECK_TARGET:-$HOME/.cache/pretrain/target-cuda-check}
    cargo clippy --locked -p pretrain-worker --features nccl --all-targets -- -D warnings
    echo "pretrain-worker checks with --features nccl (compute capability $CUDA_COMPUTE_CAP)"
    ;;
build)
    export CARGO_TARGET_DIR="$target"
    cargo build --locked --release -p pretrain-worker --features nccl --bin pretrain-worker --bin bench-train --bin check-kernels
    mkdir -p dist/gpu
    for bin in pretrain-worker bench-train check-kernels; do
        strip -o "dist/gpu/$bin" "$target/release/$bin"
        gzip -9f "dist/gpu/$bin"
    done
    ls -l dist/gpu
    echo "built dist/gpu/{pretrain-worker,bench-train,check-kernels}.gz with NCCL (compute capability $CUDA_COMPUTE_CAP);"
    echo "on the GPU machine: gunzip them; they need the NVIDIA driver, CUDA 13 and NCCL 2 libraries"
    ;;
*)
    echo "usage: $0 toolkit|check|build" >&2
    exit 2
    ;;
esac
