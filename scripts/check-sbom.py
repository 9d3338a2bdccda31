#!/usr/bin/env python3
"""The committed binary SBOM lists exactly the crates cxr-serve is built from.

    python3 scripts/check-sbom.py [deploy/sbom/cxr-serve.cdx.json]

Compares the SBOM's components (name, version) with the dependency tree of the `cxr`
package as `Cargo.lock` resolves it now (`cargo metadata --offline --locked`: normal
and build dependencies, default features as the image builds, on
x86_64-unknown-linux-gnu). A crate added, removed or bumped without regenerating the
SBOM (`bash scripts/supply-chain.sh`) fails here, naming it. Offline, seconds.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = "x86_64-unknown-linux-gnu"


def lock_tree() -> set:
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--offline", "--locked", "--format-version", "1",
         "--filter-platform", TARGET],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for d in nodes[pid]["deps"]:
            if any(k["kind"] != "dev" for k in d["dep_kinds"]):
                todo.append(d["pkg"])
    seen.discard(root)
    return {(pkgs[p]["name"], pkgs[p]["version"]) for p in seen}


def main() -> int:
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy/sbom/cxr-serve.cdx.json"
    bom = json.loads(path.read_text())
    listed = {(c["name"], c["version"]) for c in bom.get("components", [])}
    want = lock_tree()
    missing, extra = sorted(want - listed), sorted(listed - want)
    for n, v in missing:
        print(f"check-sbom: {n} {v} is in Cargo.lock's tree of cxr-serve, not in {path.name}")
    for n, v in extra:
        print(f"check-sbom: {n} {v} is in {path.name}, not in Cargo.lock's tree of cxr-serve")
    if missing or extra:
        print("check-sbom: regenerate with `bash scripts/supply-chain.sh` and commit deploy/sbom/")
        return 1
    print(f"check-sbom: {path.name} lists the {len(want)} crates of Cargo.lock's tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
