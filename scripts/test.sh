#!/usr/bin/env bash
# The test command: sets up what the tests need (idempotent), then runs the checks
# and the whole test suite, trainer included. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --train
source scripts/env.sh
cargo fmt --all --check
cargo clippy --locked --all-targets --all-features -- -D warnings
cargo test --locked --all-features
