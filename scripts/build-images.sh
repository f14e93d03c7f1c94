#!/usr/bin/env bash
# The operator and CPU worker images as OCI archives, without Docker or any container engine:
# release binaries, the shared libraries they load, CA certificates and user 65532, one layer each
# (testcluster/src/oci.rs). The archives load with `skopeo copy oci-archive:dist/images/pretrain.oci.tar
# docker://REGISTRY/...`, `podman load` or `crane push`; the cluster tests run their pods from archives
# built the same way. images/*.Dockerfile build the same images (and the CUDA worker) with Docker.
#
#   scripts/build-images.sh [OUT]    (default dist/images)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/images}
cargo build --release --locked -p pretrain-operator --bin pretrain -p pretrain-worker --bin pretrain-worker
cargo run --quiet --locked -p pretrain-testcluster --bin pretrain-testcluster -- images --bins target/release --out "$out"
