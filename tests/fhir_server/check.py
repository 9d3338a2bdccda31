"""Reads back what a FHIR server holds of cxr's results and checks it (tests/fhir.rs).

    tests/fhir_server/.venv/bin/python tests/fhir_server/check.py URL [TOKEN]

Every DiagnosticReport, Observation and Device on the server is parsed with
fhir.resources' FHIR R4 (4.0.1) models (an invalid resource fails the run), and each
report's references are followed by reading them from the server:
DiagnosticReport.result -> Observation, Observation.device -> Device. Prints one
JSON object: the counts, and per report what the test asserts on.
"""

import json
import sys
import urllib.request

import fhir.resources
from fhir.resources import construct_fhir_element

assert fhir.resources.__fhir_version__ == "4.0.1", fhir.resources.__fhir_version__

BASE = sys.argv[1].rstrip("/")
TOKEN = sys.argv[2] if len(sys.argv) > 2 else None


def get(path):
    req = urllib.request.Request(f"{BASE}/{path}", headers={"Accept": "application/fhir+json"})
    if TOKEN:
        req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def valid(resource):
    """The resource as R4 models it, or the run fails with the model's errors."""
    construct_fhir_element(resource["resourceType"], resource)
    return resource


def read(reference):
    kind, _, rid = reference.partition("/")
    assert kind and rid and "/" not in rid, f"not a literal reference: {reference}"
    return valid(get(f"{kind}/{rid}"))


def codes(concepts):
    return [c.get("code") for cc in concepts or [] for c in cc.get("coding", [])]


out = {"counts": {}, "reports": []}
stored = {}
for kind in ("DiagnosticReport", "Observation", "Device"):
    bundle = valid(get(f"{kind}?_count=1000"))
    stored[kind] = [valid(e["resource"]) for e in bundle.get("entry", [])]
    out["counts"][kind] = len(stored[kind])

for dr in stored["DiagnosticReport"]:
    report = {
        "identifiers": [i.get("value") for i in dr.get("identifier", [])],
        "status": dr["status"],
        "category": codes(dr.get("category")),
        "code": codes([dr["code"]]),
        "conclusion": dr.get("conclusion"),
        "security": [s["code"] for s in dr.get("meta", {}).get("security", [])],
        "tags": [t["code"] for t in dr.get("meta", {}).get("tag", [])],
        "subject": dr.get("subject"),
        "basedOn": dr.get("basedOn", []),
        "imagingStudy": dr.get("imagingStudy", []),
        "observations": [],
    }
    for ref in dr.get("result", []):
        obs = read(ref["reference"])
        device = read(obs["device"]["reference"])
        report["observations"].append(
            {
                "id": obs["id"],
                "code": codes([obs["code"]]),
                "value": codes([obs["valueCodeableConcept"]]),
                "interpretation": codes(obs.get("interpretation")),
                "security": [s["code"] for s in obs.get("meta", {}).get("security", [])],
                "components": {
                    c["code"]["coding"][0]["code"]: c.get("valueQuantity", {}).get("value")
                    or c.get("valueString")
                    or codes([c.get("valueCodeableConcept", {})])
                    for c in obs.get("component", [])
                },
                "notes": [n["text"] for n in obs.get("note", [])],
                "derivedFrom": obs.get("derivedFrom", []),
                "device": {
                    "id": device["id"],
                    "names": [n["name"] for n in device.get("deviceName", [])],
                    "versions": [v["value"] for v in device.get("version", [])],
                },
            }
        )
    out["reports"].append(report)

print(json.dumps(out))
