#!/usr/bin/env bash
# The run command: sets up ONNX Runtime (idempotent), builds cxr-serve in release
# mode and serves the models in models/. Extra arguments go to cxr-serve
# (see `cxr-serve --help`), e.g. `bash scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --locked --release --bin cxr-serve -- --models-dir models "$@"
