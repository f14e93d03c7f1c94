# syntax=docker/dockerfile:1
# The CUDA worker image, ghcr.io/pretrain-dev/pretrain-worker-cuda: `pretrain-worker` built with
# `--features nccl` (candle's CUDA kernels, cuBLAS, our fused kernels, data parallel over NCCL), on
# the CUDA 13.0 runtime with NCCL 2.28. Runs with `train.resources.gpusPerNode` above 0 on nodes
# whose driver supports CUDA 13.0 (R580 or newer).
#
#   docker build -f images/worker-cuda.Dockerfile -t ghcr.io/pretrain-dev/pretrain-worker-cuda:0.1.0 .
#
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are compiled for (90: H100/H200).
# Without Docker, scripts/cuda-toolkit.sh build makes the same binary from the toolkit's PyPI wheels.
ARG CUDA_VERSION=13.0.2
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
        libnccl2=2.28.*+cuda13.0 libnccl-dev=2.28.*+cuda13.0 \
    && rm -rf /var/lib/apt/lists/* \
    && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pretrain-worker --features nccl --bin pretrain-worker \
    && install -m 0755 target/release/pretrain-worker /pretrain-worker

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
# cuBLAS and cuRAND come with the runtime image; NCCL is the one library to add.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnccl2=2.28.*+cuda13.0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --create-home nonroot
COPY --from=build /pretrain-worker /usr/local/bin/pretrain-worker
USER 65532:65532
ENTRYPOINT ["pretrain-worker"]
