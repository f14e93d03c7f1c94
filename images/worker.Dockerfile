# syntax=docker/dockerfile:1
# The CPU worker image, ghcr.io/pretrain-dev/pretrain-worker: `pretrain-worker`, every stage on the
# CPU (runs with `train.resources.gpusPerNode: 0`).
#
#   docker build -f images/worker.Dockerfile -t ghcr.io/pretrain-dev/pretrain-worker:0.1.0 .
#
# The same image without a container engine: scripts/build-images.sh (an OCI archive, the one the
# cluster tests run).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pretrain-worker --bin pretrain-worker \
    && install -m 0755 target/release/pretrain-worker /pretrain-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /pretrain-worker /usr/local/bin/pretrain-worker
USER 65532:65532
ENTRYPOINT ["pretrain-worker"]
