# syntax=docker/dockerfile:1
#
# mpt-server container images.
#
#   CPU:          docker build --target cpu  -t mpt-server:cpu .
#   NVIDIA GPU:   docker build --target cuda -t mpt-server:cuda .
#
# The cuda target builds with `--features cuda`, which compiles but has not yet run on a GPU:
# treat the GPU image as untested. Both runtime images hold the mpt-server binary only, run as a
# non-root user, listen on 8000 and read models from /models:
#
#   docker run --rm -p 8000:8000 mpt-server:cpu                      # bundled demo model
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" mpt-server:cpu --model /models/mpt-7b
#
# Build steps match README: `cargo build --release --locked -p mpt-server` (plus
# `--features cuda` for the GPU image). The dependency layer is rebuilt only when a Cargo.toml,
# Cargo.lock or rust-toolchain.toml changes.

ARG RUST_VERSION=1.95.0
# CUDA 13.0, as .ci/cuda-toolkit.sh pins for CI (the GPU machines we test on run driver 580).
ARG CUDA_VERSION=13.0.2
ARG CUDA_UBUNTU=ubuntu24.04

# ---- skeleton: the workspace's manifests with empty sources, to build dependencies alone ------
# This stage sees every source, but its output changes only when a manifest, Cargo.lock or
# rust-toolchain.toml does, so the dependency layers below stay cached while code changes.
FROM debian:bookworm-slim AS skeleton
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# Keep the manifests; give each package an empty lib and main, and an empty `fn main` at every
# target or build-script path a manifest names, so that cargo can resolve and compile every
# dependency without our code.
RUN find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name rust-toolchain.toml -delete \
    && find . -name Cargo.toml | while read -r manifest; do \
        dir=$(dirname "$manifest"); \
        grep -q '^\[package\]' "$manifest" || continue; \
        mkdir -p "$dir/src" && touch "$dir/src/lib.rs" && echo 'fn main() {}' > "$dir/src/main.rs"; \
        sed -n 's/^\(path\|build\) *= *"\(.*\.rs\)".*/\2/p' "$manifest" | while read -r target; do \
            mkdir -p "$(dirname "$dir/$target")" && echo 'fn main() {}' > "$dir/$target"; \
        done; \
    done

# ---- CPU build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build-cpu
ARG RUST_VERSION
# Use the image's toolchain (the same version rust-toolchain.toml pins) without fetching the
# rustfmt/clippy components that file asks for.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION}
WORKDIR /src
COPY --from=skeleton /src ./
RUN cargo build --release --locked -p mpt-server
COPY . .
# Our sources must look newer than the skeleton's empty files, or cargo keeps the empty build.
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p mpt-server \
    && install -D -m 0755 target/release/mpt-server /out/mpt-server

# ---- CPU runtime: glibc + libgcc only, uid 65532 -----------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS cpu
COPY --from=build-cpu /out/mpt-server /usr/local/bin/mpt-server
USER 65532:65532
EXPOSE 8000
VOLUME ["/models"]
ENTRYPOINT ["mpt-server"]

# ---- CUDA build (the `cuda` feature: compiles, not yet run on a GPU) ---------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS build-cuda
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH \
    RUSTUP_TOOLCHAIN=${RUST_VERSION}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
# candle's and our CUDA kernels are compiled for this compute capability (80 = A100, 90 = H100).
# CUDA_VERSION must suit your nodes' driver: 13.0 needs >= 580; on driver 570 build with
# --build-arg CUDA_VERSION=12.8.1 (12.8 needs >= 570).
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY --from=skeleton /src ./
RUN cargo build --release --locked -p mpt-server --features cuda
COPY . .
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p mpt-server --features cuda \
    && install -D -m 0755 target/release/mpt-server /out/mpt-server

# ---- CUDA runtime: CUDA user-space libraries + the binary, uid 65532 ---------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS cuda
RUN groupadd --system --gid 65532 nonroot \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build-cuda /out/mpt-server /usr/local/bin/mpt-server
USER 65532:65532
EXPOSE 8000
VOLUME ["/models"]
ENTRYPOINT ["mpt-server"]

# The last stage is the default target: plain `docker build .` gives the CPU image.
FROM cpu
