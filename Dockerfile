# cxr-serve, the pneumonia classifier service, as a container.
#
#   docker build -t cxr:cpu .                              # CPU image (default target)
#   docker build -t cxr:cuda --target runtime-cuda .       # CUDA image (falls back to CPU)
#   docker run --rm -p 8080:8080 cxr:cpu
#   docker run --rm -p 8080:8080 -v "$PWD/models:/opt/cxr/models:ro" cxr:cpu   # other models
#
# Stages: `chef`, `planner` and `build` compile cxr-serve (dependencies in their own
# cached layer, by cargo-chef);
# `ort-cpu` / `ort-cuda` take ONNX Runtime's shared library from the official PyPI
# wheels, `openvino-cpu` OpenVINO's (the CPU image's second backend); `runtime-cuda` and `runtime` (last, so the default) hold only the binary,
# the library and models/. Configuration is by CXR_* environment variables (README).

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm
ARG ORT_VERSION=1.32.0
ARG OPENVINO_VERSION=2026.4.1
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------- build
# Dependencies in their own cached layer, by cargo-chef: `prepare` derives a recipe
# (the manifests and a skeleton of every target) from the sources as they are, so the
# cached layer cannot go stale when a target is added; `cook` builds the dependencies
# from it, and is rebuilt only when the recipe changes.
FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME:-/usr/local/cargo}/registry"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
# No debug info in the image's binary; function names stay for backtraces.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin cxr-serve
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY assets assets
COPY src src
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bin cxr-serve \
    && cp target/release/cxr-serve /cxr-serve \
    && /cxr-serve --version

# ------------------------------------------------------- ONNX Runtime from PyPI
FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS pip
# Build-stage tools only (not in the runtime image); Debian's archive pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM pip AS ort-cpu
ARG ORT_VERSION
# The wheel is only unpacked (its Python parts are not used): take the library.
RUN python3 -m pip download --no-deps --only-binary=:all: --python-version 311 \
        --platform manylinux_2_28_x86_64 --dest /wheels "onnxruntime==${ORT_VERSION}" \
    && python3 -m zipfile -e /wheels/onnxruntime-${ORT_VERSION}-*.whl /wheel \
    && mkdir -p /out \
    && cp -P /wheel/onnxruntime/capi/libonnxruntime*.so* /out/ \
    && test -f "/out/libonnxruntime.so.${ORT_VERSION}"

FROM pip AS ort-cuda
ARG ORT_VERSION
# onnxruntime-gpu: the library and its CUDA execution provider (CUDA 13, cuDNN 9; the
# CUDA and cuDNN libraries themselves come from the runtime base image).
RUN python3 -m pip download --no-deps --only-binary=:all: --python-version 311 \
        --platform manylinux_2_28_x86_64 --dest /wheels "onnxruntime-gpu==${ORT_VERSION}" \
    && python3 -m zipfile -e /wheels/onnxruntime_gpu-${ORT_VERSION}-*.whl /wheel \
    && mkdir -p /out \
    && cp -P /wheel/onnxruntime/capi/libonnxruntime*.so* /out/ \
    && test -f "/out/libonnxruntime.so.${ORT_VERSION}" \
    && test -f /out/libonnxruntime_providers_cuda.so

FROM pip AS openvino-cpu
ARG OPENVINO_VERSION
# OpenVINO, the second CPU backend (--backend openvino|auto), from its PyPI wheel as
# scripts/setup.sh installs it: the C library and what it loads for ONNX files on the
# CPU (the core, the CPU plugin, the ONNX front end, TBB), and the IR front end, with
# which OpenVINO reads its compiled-model cache back (CXR_OPENVINO_CACHE_DIR; without
# it every entry fails to load and every start compiles again: issue 45), nothing
# else. tests/openvino.rs runs the binary on exactly this list.
RUN python3 -m pip download --no-deps --only-binary=:all: --python-version 311 \
        --platform manylinux_2_28_x86_64 --dest /wheels "openvino==${OPENVINO_VERSION}" \
    && python3 -m zipfile -e /wheels/openvino-${OPENVINO_VERSION}-*.whl /wheel \
    && mkdir -p /out \
    && libs=/wheel/openvino/libs \
    && cp "$libs"/libopenvino_c.so.* "$libs"/libopenvino.so.* "$libs"/libopenvino_intel_cpu_plugin.so \
        "$libs"/libopenvino_onnx_frontend.so.* "$libs"/libopenvino_ir_frontend.so.* \
        "$libs"/libtbb.so.12 "$libs"/libtbbbind_2_5.so.3 "$libs"/libhwloc.so.15 /out/ \
    && c=$(basename /out/libopenvino_c.so.*) && ln -s "$c" /out/libopenvino_c.so

# ----------------------------------------------------------------- runtime, CUDA
FROM ${CUDA_IMAGE} AS runtime-cuda
ARG ORT_VERSION
LABEL org.opencontainers.image.title="cxr (CUDA)" \
      org.opencontainers.image.description="Pediatric chest X-ray pneumonia classifier (DenseNet-161, ONNX Runtime with CUDA, CPU fallback)" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cxr
COPY --from=build /cxr-serve /usr/local/bin/cxr-serve
COPY --from=ort-cuda /out/ /opt/cxr/lib/
COPY models/ /opt/cxr/models/
ENV CXR_HOST=0.0.0.0 \
    CXR_PORT=8080 \
    CXR_MODELS_DIR=/opt/cxr/models \
    CXR_DEVICE=auto \
    CXR_LOG_FORMAT=json \
    ORT_DYLIB_PATH=/opt/cxr/lib/libonnxruntime.so.${ORT_VERSION} \
    RUST_LIB_BACKTRACE=0 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=536870912 \
    MALLOC_TRIM_THRESHOLD_=1073741824
USER 10001:10001
EXPOSE 8080 9090 11112
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/cxr-serve", "--health-check"]
ENTRYPOINT ["/usr/local/bin/cxr-serve"]

# ------------------------------------------------------------ runtime, CPU (default)
FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
ARG ORT_VERSION
LABEL org.opencontainers.image.title="cxr" \
      org.opencontainers.image.description="Pediatric chest X-ray pneumonia classifier (DenseNet-161 on ONNX Runtime or OpenVINO, CPU)" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# /var/lib/cxr/backend: the backend decision and OpenVINO's compiled models, for a
# volume shared by the replicas (a named volume starts owned by the user).
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cxr \
    && install -d -o 10001 -g 10001 /var/lib/cxr/backend
COPY --from=build /cxr-serve /usr/local/bin/cxr-serve
COPY --from=ort-cpu /out/ /opt/cxr/lib/
COPY --from=openvino-cpu /out/ /opt/cxr/openvino/
COPY models/ /opt/cxr/models/
# Only signed models answer: each version's OMS bundle (models/<name>.sig, by
# scripts/sign-models.sh) verified at start against the committed public key
# (docs/security.md); a deployment that rotates signers mounts its own file here.
COPY deploy/signing/ /opt/cxr/signing/
# The CPU image serves each model on the backend the deployment's decision names,
# measured once per model file and CPU and kept in CXR_BACKEND_DECISION (with
# OpenVINO's compiled models beside it; docs/performance.md); CXR_BACKEND=ort keeps
# ONNX Runtime.
ENV CXR_HOST=0.0.0.0 \
    CXR_PORT=8080 \
    CXR_MODELS_DIR=/opt/cxr/models \
    CXR_DEVICE=cpu \
    CXR_BACKEND=auto \
    CXR_BACKEND_DECISION=/var/lib/cxr/backend/backend.decision.json \
    CXR_TRUSTED_SIGNERS=/opt/cxr/signing/trusted-signers.toml \
    CXR_REQUIRE_SIGNED_MODELS=true \
    OPENVINO_LIB=/opt/cxr/openvino/libopenvino_c.so \
    CXR_LOG_FORMAT=json \
    ORT_DYLIB_PATH=/opt/cxr/lib/libonnxruntime.so.${ORT_VERSION} \
    RUST_LIB_BACKTRACE=0 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=536870912 \
    MALLOC_TRIM_THRESHOLD_=1073741824
USER 10001:10001
EXPOSE 8080 9090 11112
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/cxr-serve", "--health-check"]
ENTRYPOINT ["/usr/local/bin/cxr-serve"]
