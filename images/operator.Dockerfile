# syntax=docker/dockerfile:1
# The operator image, ghcr.io/pretrain-dev/pretrain: the `pretrain` binary (operator, CLI).
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/pretrain-dev/pretrain:0.1.0 .
#
# The same image without a container engine: scripts/build-images.sh (an OCI archive, the one the
# cluster tests run).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pretrain-operator --bin pretrain \
    && install -m 0755 target/release/pretrain /pretrain

# glibc, libgcc and CA certificates, user 65532 (nonroot): what the binary needs and nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /pretrain /usr/local/bin/pretrain
USER 65532:65532
ENTRYPOINT ["pretrain"]
