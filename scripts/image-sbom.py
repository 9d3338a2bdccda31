#!/usr/bin/env python3
"""The CPU image's CycloneDX 1.5 SBOM, offline, from what the repository pins.

    python3 scripts/image-sbom.py    # writes deploy/sbom/cxr-cpu-image.cdx.json

The image (Dockerfile, target `runtime`) holds: the cxr-serve binary (its crates:
deploy/sbom/cxr-serve.cdx.json, by cargo-cyclonedx), the ONNX Runtime and OpenVINO
libraries unpacked from their PyPI wheels (the Dockerfile's ORT_VERSION and
OPENVINO_VERSION; licenses read from the same versions' wheel metadata in .venv),
the libraries OpenVINO's wheel bundles (oneTBB, hwloc), the models (models/*.onnx,
with their SHA-256) and the Debian base image (debian:<DEBIAN_RELEASE>-slim).

Not covered: the Debian base image's own packages (the runtime stage installs none,
and the base's package list cannot be read offline: `syft scan` of the built image,
`bash scripts/supply-chain.sh --image`, lists them) and the libraries ONNX Runtime's
wheel links statically (its ThirdPartyNotices.txt names them; no versions).
Deterministic: the same inputs write the same bytes (no timestamp; the serial number
is derived from the content).
"""

import hashlib
import json
import pathlib
import re
import sys
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUST_SBOM = ROOT / "deploy/sbom/cxr-serve.cdx.json"
OUT = ROOT / "deploy/sbom/cxr-cpu-image.cdx.json"


def dockerfile_args() -> dict:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"ARG (\w+)=(\S+)", line)
        if m:
            args.setdefault(m.group(1), m.group(2))
    return args


def wheel_license(name: str, version: str) -> dict:
    """The license of PyPI `name`==`version` from its metadata in .venv (the same
    version only: another one's could differ)."""
    for d in ROOT.glob(f".venv/lib/python3*/site-packages/{name}-{version}.dist-info"):
        meta = (d / "METADATA").read_text(errors="replace")
        m = re.search(r"^License-Expression: (.+)$", meta, re.M)
        if m:
            return {"license": {"id": m.group(1).strip()}} if " " not in m.group(1).strip() \
                else {"expression": m.group(1).strip()}
        m = re.search(r"^Classifier: License :: OSI Approved :: (.+)$", meta, re.M)
        if m:
            spdx = {"MIT License": "MIT", "Apache Software License": "Apache-2.0"}
            lic = m.group(1).strip()
            return {"license": {"id": spdx[lic]} if lic in spdx else {"name": lic}}
    sys.exit(f"image-sbom: {name}=={version} is not in .venv: bash scripts/setup.sh --test")


def pypi(name: str, version: str, description: str) -> dict:
    return {
        "type": "library",
        "bom-ref": f"pkg:pypi/{name}@{version}",
        "name": name,
        "version": version,
        "description": description,
        "licenses": [wheel_license(name, version)],
        "purl": f"pkg:pypi/{name}@{version}",
    }


def main() -> None:
    if not RUST_SBOM.is_file():
        sys.exit(f"image-sbom: {RUST_SBOM} missing: bash scripts/supply-chain.sh first")
    rust = json.loads(RUST_SBOM.read_text())
    a = dockerfile_args()
    ort, ov, debian = a["ORT_VERSION"], a["OPENVINO_VERSION"], a["DEBIAN_RELEASE"]
    tbb_pc = next(ROOT.glob(".venv/lib/python3*/site-packages/openvino/libs/tbb.pc"), None)
    tbb = None
    if tbb_pc:
        m = re.search(r"^Version: (\S+)", tbb_pc.read_text(), re.M)
        tbb = m.group(1) if m else None

    binary = dict(rust["metadata"]["component"])
    components = [binary] + rust.get("components", [])
    components += [
        pypi("onnxruntime", ort,
             "libonnxruntime.so unpacked from the wheel into /opt/cxr/lib (its Python parts are not copied)"),
        pypi("openvino", ov,
             "libopenvino*.so (C API, CPU plugin, ONNX frontend) unpacked from the wheel into /opt/cxr/openvino"),
        {
            "type": "library",
            "bom-ref": "bundled:openvino/onetbb",
            "name": "oneTBB",
            **({"version": tbb} if tbb else {}),
            "description": f"libtbb.so.12, libtbbbind_2_5.so.3 as bundled in the openvino {ov} wheel",
            "licenses": [{"license": {"id": "Apache-2.0"}}],
        },
        {
            "type": "library",
            "bom-ref": "bundled:openvino/hwloc",
            "name": "hwloc",
            "description": f"libhwloc.so.15 as bundled in the openvino {ov} wheel (version not recorded in the wheel)",
            "licenses": [{"license": {"id": "BSD-3-Clause"}}],
        },
        {
            "type": "container",
            "bom-ref": f"pkg:docker/library/debian@{debian}-slim",
            "name": "debian",
            "version": f"{debian}-slim",
            "description": "the runtime stage's base image; its Debian packages are not listed here (scripts/supply-chain.sh --image: syft)",
            "purl": f"pkg:docker/library/debian@{debian}-slim",
        },
    ]
    for onnx in sorted((ROOT / "models").rglob("*.onnx")):
        rel = onnx.relative_to(ROOT).as_posix()
        components.append({
            "type": "machine-learning-model",
            "bom-ref": f"file:{rel}",
            "name": rel,
            "hashes": [{"alg": "SHA-256", "content": hashlib.sha256(onnx.read_bytes()).hexdigest()}],
            "description": f"copied to /opt/cxr/{rel} (signed: its version's .sig bundle)",
        })
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "tools": [{"name": "scripts/image-sbom.py"}],
            "component": {
                "type": "container",
                "bom-ref": "cxr-cpu-image",
                "name": "cxr",
                "version": binary.get("version", ""),
                "description": "the CPU image (Dockerfile target runtime)",
            },
            "properties": [
                {"name": "cxr:not-covered", "value": "the Debian base image's packages; libraries linked statically into ONNX Runtime"},
            ],
        },
        "components": components,
        "dependencies": [{"ref": "cxr-cpu-image", "dependsOn": [c["bom-ref"] for c in components]}]
        + rust.get("dependencies", []),
    }
    body = json.dumps(bom, sort_keys=True).encode()
    bom["serialNumber"] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(body).hexdigest())}"
    OUT.write_text(json.dumps(bom, indent=2) + "\n")
    print(f"{OUT.relative_to(ROOT)}: {len(components)} components")


if __name__ == "__main__":
    main()
