# qwen-serve image: qwen-router and qwen-worker in /usr/local/bin. Models are mounted, not baked.
#
#   docker build -t qwen-serve:0.1.0 .                                        # CPU
#   docker build --build-arg VARIANT=cuda -t qwen-serve:0.1.0-cuda .          # CUDA + NCCL, sm_90
#   docker build --build-arg VARIANT=cuda --build-arg CUDA_COMPUTE_CAP=80 ... # e.g. A100
#
# VARIANT picks the builder and runtime stages below (builder-cpu/runtime-cpu or
# builder-cuda/runtime-cuda); BuildKit (the default builder) builds only the stages used.
#
#   docker run --rm -p 8000:8000 -p 50050:50050 qwen-serve:0.1.0 qwen-router \
#     --http-listen 0.0.0.0:8000 --grpc-listen 0.0.0.0:50050 --worker http://host:50051
#   docker run --rm --gpus all -v /data/models:/models:ro qwen-serve:0.1.0-cuda qwen-worker serve \
#     --model /models/Qwen2.5-7B-Instruct --listen 0.0.0.0:50051 --device cuda --dtype bf16

ARG VARIANT=cpu
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.2

# ---- builders -------------------------------------------------------------------------------

FROM rust:${RUST_VERSION}-bookworm AS builder-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
ENV CARGO_TARGET_DIR=/cache/target-cpu \
    QWEN_CARGO_FEATURES=""

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS builder-cuda
ARG RUST_VERSION
# GPU architecture of candle's CUDA kernels (no GPU at build time): 90 = H100/H200, 80 = A100,
# 89 = L4/L40S/RTX 4090, 100 = B200.
ARG CUDA_COMPUTE_CAP=90
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version
# The devel image has nvcc, the CUDA libraries and NCCL (libnccl-dev); candle links them
# dynamically (libcuda through the image's stubs in LIBRARY_PATH).
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDARC_CUDA_VERSION=13000 \
    CARGO_TARGET_DIR=/cache/target-cuda \
    QWEN_CARGO_FEATURES="--features qwen-worker/cuda,qwen-worker/nccl"

# hadolint ignore=DL3006
FROM builder-${VARIANT} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between builds; the binaries are copied out of
# the cached target dir in the same step.
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache \
    cargo build --release --locked -p qwen-worker -p qwen-router ${QWEN_CARGO_FEATURES} \
 && mkdir -p /out \
 && cp "${CARGO_TARGET_DIR}/release/qwen-worker" "${CARGO_TARGET_DIR}/release/qwen-router" /out/

# ---- runtimes -------------------------------------------------------------------------------

FROM debian:bookworm-slim AS runtime-cpu
# procps: `qwen-worker serve --tp N` stops its rank processes with kill(1).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
# The runtime image brings cudart, cuBLAS, cuRAND, NVRTC and NCCL; the driver (libcuda) comes
# from the host through the NVIDIA container toolkit.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*
# The driver's JIT cache of the kernels' PTX: /tmp is writable (an emptyDir in the manifests)
# where the root filesystem is read-only and the user has no home.
# The CUDA image computes on the GPU unless told otherwise (--device / QWEN_DEVICE).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    QWEN_DEVICE=cuda

# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
LABEL org.opencontainers.image.title="qwen-serve" \
      org.opencontainers.image.description="qwen-router and qwen-worker (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 qwen \
 && useradd --system --uid 10001 --gid qwen --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin qwen
COPY --from=builder /out/qwen-worker /out/qwen-router /usr/local/bin/
USER 10001:10001
# Router: 50050 gRPC, 8000 HTTP (OpenAI API, /health, /metrics).
# Worker: 50051 gRPC, 9091 metrics, 29500 rank 0's collectives (multi-host groups).
EXPOSE 50050 8000 50051 9091 29500
CMD ["qwen-router", "--help"]
