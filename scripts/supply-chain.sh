#!/usr/bin/env bash
# The supply chain's checks: the license, duplicate-version and source policy
# (deny.toml, offline), and CycloneDX SBOMs of the binary and of the CPU image,
# written under deploy/sbom/ (committed: a release diffs them).
#
#   bash scripts/supply-chain.sh            # policy + binary SBOM
#   bash scripts/supply-chain.sh --image    # + the image's SBOM (syft, podman)
#
# Tools: cargo install --locked cargo-deny@0.18.3 cargo-cyclonedx@0.5.7 (and syft for
# the image). On a connected machine also: cargo install --locked cargo-audit; cargo
# audit (the RustSec advisory database is fetched; not run offline).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch --locked
cargo deny --offline check licenses bans sources
mkdir -p deploy/sbom
cargo cyclonedx --format json --spec-version 1.5 --all-features --override-filename cxr.cdx
mv -f cxr.cdx.json deploy/sbom/cxr-serve.cdx.json
if [ "${1:-}" = --image ]; then
  podman build --target runtime -t cxr:sbom .
  syft scan podman:cxr:sbom -o cyclonedx-json=deploy/sbom/cxr-cpu-image.cdx.json
fi
echo "SBOMs in deploy/sbom/"
