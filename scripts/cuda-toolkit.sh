#!/usr/bin/env bash
# Builds `pretrain-worker` with the `cuda` feature on a machine without a CUDA install, from the
# CUDA 13.0 PyPI wheels (nvcc, cuBLAS, cuRAND, NVRTC, runtime) and a link-only libcuda stub. The
# binary then runs on any machine with an NVIDIA driver for CUDA 13.0+ and the CUDA 13 libraries.
#
#   scripts/cuda-toolkit.sh [TOOLKIT_DIR]     (default ~/.cache/pretrain/cuda-13.0)
#
# Set CUDA_COMPUTE_CAP for another GPU generation (default 90: H100/H200). The kernels compile
# with nvcc at build time (about 20 minutes on 2 cores). PRETRAIN_CUDA_TOOLKIT_ONLY=1 stops after
# preparing the toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-$HOME/.cache/pretrain/cuda-13.0}

if [ ! -x "$root/bin/nvcc" ]; then
    tmp=$(mktemp -d)
    # Pin 13.0: PTX from a newer nvcc does not load on a 13.0 driver.
    python3 -m pip download --quiet --no-deps -d "$tmp/wheels" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-curand"
    for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tmp/tree"; done
    rm -rf "$root" && mkdir -p "$(dirname "$root")"
    mv "$tmp/tree/nvidia/cu13" "$root"
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    (cd "$root/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done &&
        ln -sf libcurand.so.10 libcurand.so)
    ln -sfn lib "$root/lib64"
    # libcuda comes with the driver; link against a stub that exports the driver API's names.
    cargo fetch --quiet
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19*/ | tail -1)
    grep -rhoE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/" | sed -E 's/pub (unsafe )?fn //' | sort -u |
        sed 's/.*/void &(void) {}/' > "$tmp/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$tmp/stub.c"
    rm -rf "$tmp"
fi

if [ -n "${PRETRAIN_CUDA_TOOLKIT_ONLY:-}" ]; then
    echo "toolkit ready in $root"
    exit 0
fi
export CUDA_ROOT="$root" CUDA_PATH="$root" NVCC="$root/bin/nvcc" PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib" LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
cargo build --release -p pretrain-worker --features cuda
echo "built target/release/pretrain-worker with CUDA (compute capability $CUDA_COMPUTE_CAP)"
