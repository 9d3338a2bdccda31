#!/usr/bin/env bash
# The run command: sets up ONNX Runtime (idempotent), builds cxr-serve in release
# mode and serves the models in models/. Extra arguments go to cxr-serve
# (see `cxr-serve --help`), e.g. `bash scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# glibc: fixed mmap threshold so that large upload buffers go back to the OS when
# freed (else the threshold adapts upwards and a burst of 32 MiB bodies stays
# resident), and two arenas instead of eight per core (bench/RESULTS.md).
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2} MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
exec cargo run --locked --release --bin cxr-serve -- --models-dir models "$@"
