#!/usr/bin/env bash
# Signs every version of the shipped models (models/) as OpenSSF Model Signing
# bundles (`models/<name>.sig`, `models/<name>/<version>/<name>.sig`), then checks
# them as cxr-serve does at start (--require-signed-models with the committed
# deploy/signing/trusted-signers.toml).
#
#   bash scripts/sign-models.sh [KEY]      # KEY default: /work/signing/cxr-models-key.pem
#
# The private key never enters the repository; its public key is
# deploy/signing/cxr-models.pub.pem. Idempotent: ECDSA signatures here are
# deterministic (RFC 6979), so signing unchanged files again rewrites the same bytes;
# re-run it after any model file changes (a refit OOD model, a new card).
set -euo pipefail
cd "$(dirname "$0")/.."
key=${1:-${CXR_SIGN_KEY:-/work/signing/cxr-models-key.pem}}
models=${CXR_MODELS_DIR:-models}
[ -r "$key" ] || { echo "sign-models: no private key at $key" >&2; exit 1; }
# The key must be the one deploy/ trusts.
want=$(sed -n '/BEGIN/,/END/p' deploy/signing/cxr-models.pub.pem)
have=$(openssl ec -in "$key" -pubout 2>/dev/null)
[ "$want" = "$have" ] || { echo "sign-models: $key is not the key of deploy/signing/cxr-models.pub.pem" >&2; exit 1; }
cargo build --quiet --bin cxr-sign
./target/debug/cxr-sign --key "$key" --models-dir "$models"
# Verified as the server verifies them before loading (every version).
./target/debug/cxr-sign --verify-with deploy/signing/trusted-signers.toml --models-dir "$models"
