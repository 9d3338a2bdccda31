#!/usr/bin/env bash
# The supply chain's checks: the license, duplicate-version and source policy
# (deny.toml, offline), and CycloneDX 1.5 SBOMs of the cxr-serve binary and of the
# CPU image, written under deploy/sbom/ (committed per release: a release diffs them;
# scripts/test.sh fails when the binary's no longer matches Cargo.lock).
#
#   bash scripts/supply-chain.sh            # policy + both SBOMs (offline)
#   bash scripts/supply-chain.sh --image    # + the built image's Debian packages (syft,
#                                           #   podman): deploy/sbom/cxr-cpu-image.syft.cdx.json
#
# Tools (scripts/setup.sh --test installs the pinned ones): cargo-deny, cargo-cyclonedx.
# On a connected machine also: cargo install --locked cargo-audit; cargo audit (the
# RustSec advisory database is fetched; not run offline).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo deny --offline check licenses bans sources
mkdir -p deploy/sbom
# The binary as the image builds it: default features, Linux x86_64, no dev-deps.
CARGO_NET_OFFLINE=true cargo cyclonedx --format json --spec-version 1.5 \
  --target x86_64-unknown-linux-gnu --override-filename cxr-serve.cdx
mv -f cxr-serve.cdx.json deploy/sbom/cxr-serve.cdx.json
python3 scripts/check-sbom.py deploy/sbom/cxr-serve.cdx.json
# The image: the binary's crates + the wheels it unpacks + the models + the base.
python3 scripts/image-sbom.py
if [ "${1:-}" = --image ]; then
  podman build --target runtime -t cxr:sbom .
  syft scan podman:cxr:sbom -o cyclonedx-json=deploy/sbom/cxr-cpu-image.syft.cdx.json
fi
echo "SBOMs in deploy/sbom/"
