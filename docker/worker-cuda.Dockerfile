# syntax=docker/dockerfile:1
# The GPU worker: sidbooth-worker and sidbooth built with `--features cuda` (candle's CUDA
# backend), on NVIDIA's CUDA runtime image.
#
#   docker build -f docker/worker-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 \
#       -t sidbooth/worker-cuda:0.1.0 .
#
# CUDA_COMPUTE_CAP is the GPU generation candle's kernels are compiled for, since the build
# machine has no GPU to ask: 80 (A100, default), 86 (A10, RTX 30xx), 89 (L4, L40S), 90 (H100,
# H200). The kernels are PTX, so a newer GPU than the one named still runs them (the driver
# compiles them on first use, cached under CUDA_CACHE_PATH).
#
# Runs only with an NVIDIA driver on the host, exposed by the NVIDIA container toolkit
# (docker run --gpus all) or Kubernetes' NVIDIA device plugin: the binaries link libcuda.
# Build steps: docker/build.sh, which CI also runs outside a container.
ARG CUDA_VERSION=12.6.3
ARG UBUNTU_RELEASE=ubuntu24.04
ARG RUST_VERSION=1.95

# The Rust toolchain: rustup's own builds, which run on any glibc newer than 2.17, so they are
# copied as they are onto the CUDA image.
FROM rust:${RUST_VERSION}-slim AS rust-toolchain

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_RELEASE} AS chef
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:${PATH}
COPY --from=rust-toolchain /usr/local/rustup /usr/local/rustup
COPY --from=rust-toolchain /usr/local/cargo /usr/local/cargo
ARG CARGO_CHEF_VERSION=0.1.77
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN docker/build.sh worker-cuda --step plan --recipe /tmp/recipe.json

FROM chef AS builder
ARG PROFILE=release
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
COPY docker/build.sh docker/build.sh
COPY --from=planner /tmp/recipe.json /tmp/recipe.json
RUN docker/build.sh worker-cuda --step deps --profile "${PROFILE}" --recipe /tmp/recipe.json
COPY . .
RUN docker/build.sh worker-cuda --profile "${PROFILE}" --out /out

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_RELEASE} AS worker
# The runtime image has cuBLAS, cuRAND and NVRTC, which candle loads; libcuda comes from the
# host's driver. ca-certificates: the S3 client trusts the system's roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sidbooth \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidbooth
COPY --chmod=0755 docker/probe.sh /usr/local/bin/sidbooth-probe
COPY --from=builder /out/sidbooth-worker /out/sidbooth /usr/local/bin/
ENV SIDBOOTH_DEVICE=cuda \
    SIDBOOTH_METRICS_ADDR=0.0.0.0:9100 \
    SIDBOOTH_LOG_FORMAT=json \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sidbooth-probe", "9100", "/metrics"]
ENTRYPOINT ["/usr/local/bin/sidbooth-worker"]
