#!/usr/bin/env bash
# The run command: sets up ONNX Runtime (idempotent), builds cxr-serve in release
# mode and serves the models in models/. Extra arguments go to cxr-serve
# (see `cxr-serve --help`), e.g. `bash scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# glibc's malloc serves ONNX Runtime only (cxr-serve's own allocations go to
# mimalloc, which returns freed pages): two arenas instead of eight per core, and
# thresholds high enough that a batch's tensors (over glibc's 32 MiB adaptive ceiling
# at batch 4-8) are reused rather than mapped and page-faulted afresh every run
# (bench/RESULTS.md, "Memory").
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2} \
  MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-536870912} \
  MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}
exec cargo run --locked --release --bin cxr-serve -- --models-dir models "$@"
