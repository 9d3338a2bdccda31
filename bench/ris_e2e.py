#!/usr/bin/env python3
"""From a C-STORE of a pediatric CR through Orthanc to its results everywhere (issue
46, the last "Must show"): the time from the C-STORE's start to the last of the SR in
Orthanc, the SC in Orthanc, the ORU at the RIS's MLLP listener and the
DiagnosticReport on the FHIR server; p50/p95/max over --films films, and each leg's
median. Not a test: it prints a Markdown block for bench/RESULTS.md and exits
non-zero when a check fails.

    .venv/bin/python bench/ris_e2e.py [--bin target/release/cxr-serve] [--films 50]
        [--models models] [--data ../shared/data/chest_xray_224]

What runs, all real, on 127.0.0.1 (a temp dir, removed at the end):
- Orthanc with the shipped routing (deploy/orthanc/orthanc.json's settings and
  route-to-cxr.lua): every CR it stores is sent on to cxr by C-STORE;
- cxr-serve (--bin) as the DICOM node, --dicom-destination Orthanc (SR and SC
  filed back into the film's study), --hl7-destination the MLLP listener of the
  tests (tests/hl7/listener.py: python-hl7, hl7apy validates each ORU before it
  ACKs and records it), --fhir-url the FHIR server of the tests
  (tests/fhir_server/server.js: Medplum's router), --outbox in the temp dir;
- the films: the first --films test JPEGs (NORMAL and PNEUMONIA alternated, sorted
  names), each wrapped by pydicom as an 8-bit CR of a child (born 2 to 9 years
  before the study date, PatientAge set), its own patient, accession and UIDs;
  sent one at a time by C-STORE (pynetdicom) to Orthanc, the next once the last
  one's four results are all seen.
The legs are polled every --poll seconds: Orthanc's REST (/tools/find, the study's
series by modality), the listener's record file, the FHIR server's DiagnosticReport
search. Checked per film: one SR and one SC in the study, one ORU and one
DiagnosticReport, all with the film's accession number, and MSH-10 derived from the
result id the DiagnosticReport carries (as src/delivery/hl7.rs derives it).
"""
import argparse, glob, hashlib, io, json, os, shutil, socket, statistics, subprocess, sys
import tempfile, time, urllib.request

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import cpu_line, free_port  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CR = "1.2.840.10008.5.1.4.1.1.1"
HOST = "127.0.0.1"

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cxr-serve"))
ap.add_argument("--models", default=os.path.join(ROOT, "models"))
ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "chest_xray_224"))
ap.add_argument("--films", type=int, default=50)
ap.add_argument("--poll", type=float, default=0.005)
ap.add_argument("--timeout", type=float, default=120, help="seconds for one film's four results")
ap.add_argument("--keep", action="store_true")
A = ap.parse_args()

WORK = tempfile.mkdtemp(prefix="cxr-ris-e2e-")
CHILDREN = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def spawn(cmd, name, **kw):
    p = subprocess.Popen(cmd, stdout=kw.pop("stdout", open(os.path.join(WORK, f"{name}.log"), "w")),
                         stderr=subprocess.STDOUT, cwd=ROOT, **kw)
    CHILDREN.append(p)
    return p


def wait_port(port, what, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def control_id(result_id):
    return "CXR" + hashlib.sha256(result_id.encode()).hexdigest()[:17]


# ---- the peers --------------------------------------------------------------------------
O_HTTP, O_DICOM, CXR_DICOM, CXR_HTTP, HL7 = (free_port() for _ in range(5))
ORTHANC = f"http://{HOST}:{O_HTTP}"


def start_orthanc():
    db = os.path.join(WORK, "orthanc-db")
    os.makedirs(db)
    cfg = {"Name": "ris-e2e", "StorageDirectory": db, "IndexDirectory": db, "HttpPort": O_HTTP,
           "DicomPort": O_DICOM, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
           "DicomAlwaysAllowStore": True,
           "DicomModalities": {"cxr": ["CXR", HOST, CXR_DICOM]},
           "LuaScripts": [os.path.join(ROOT, "deploy", "orthanc", "route-to-cxr.lua")]}
    path = os.path.join(WORK, "orthanc.json")
    json.dump(cfg, open(path, "w"))
    spawn([shutil.which("Orthanc") or "/usr/sbin/Orthanc", path], "orthanc")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            return get(f"{ORTHANC}/system")
        except Exception:
            time.sleep(0.2)
    sys.exit("Orthanc did not start in 30 s")


def start_fhir():
    p = spawn(["node", os.path.join(ROOT, "tests", "fhir_server", "server.js"), "--port", "0"], "fhir",
              stdout=subprocess.PIPE)
    line = p.stdout.readline().decode().strip()
    if not line.startswith("listening "):
        sys.exit(f"the FHIR server did not start: {line!r}")
    return f"http://{HOST}:{line.split()[1]}"


def start_cxr(fhir):
    peers = os.path.join(WORK, "peers.toml")
    open(peers, "w").write('[[peers]]\nae_title = "ORTHANC"\nhosts = ["127.0.0.1"]\n')
    cmd = [A.bin, "--host", HOST, "--port", str(CXR_HTTP), "--models-dir", A.models, "--device", "cpu",
           "--dicom-port", str(CXR_DICOM), "--dicom-ae-title", "CXR", "--dicom-peers-file", peers,
           "--dicom-destination", f"ORTHANC@{HOST}:{O_DICOM}",
           "--hl7-destination", f"{HOST}:{HL7}", "--fhir-url", fhir,
           "--outbox", os.path.join(WORK, "outbox.sqlite"), "--log-format", "json"]
    p = spawn(cmd, "cxr-serve")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{CXR_HTTP}/ready", timeout=5) as r:
                if r.status == 200:
                    return p
        except Exception:
            pass
        time.sleep(0.5)
    sys.exit(f"cxr-serve did not get ready (rc {p.poll()}); see {WORK}/cxr-serve.log")


# ---- the films --------------------------------------------------------------------------
def film_paths():
    normal = sorted(glob.glob(os.path.join(A.data, "test", "NORMAL", "*.jpeg")))
    pneumonia = sorted(glob.glob(os.path.join(A.data, "test", "PNEUMONIA", "*.jpeg")))
    out = [f for pair in zip(normal, pneumonia) for f in pair][: A.films]
    if len(out) < A.films:
        sys.exit(f"{len(out)} test films under {A.data}/test, {A.films} asked")
    return out


def cr_dataset(i, path):
    """Film `i` as a CR of a child (2 to 9 years old), its own patient and study."""
    px = np.asarray(Image.open(path).convert("L"))
    age = 2 + i % 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientSex = f"CHILD^{i:03d}", f"PED-{i:05d}", "MF"[i % 2]
    ds.PatientBirthDate, ds.PatientAge = f"{2026 - age}0315", f"{age:03d}Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261207", "120000", f"ACC{i:05d}"
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientOrientation = ["R", "F"]
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = px.tobytes()
    return ds


# ---- the legs ---------------------------------------------------------------------------
def orthanc_modalities(study_uid):
    found = post(f"{ORTHANC}/tools/find",
                 {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
    return [s["MainDicomTags"].get("Modality") for s in found]


def orus(record):
    try:
        return [json.loads(l) for l in open(record, encoding="utf-8") if l.strip()]
    except FileNotFoundError:
        return []


def reports(fhir):
    b = get(f"{fhir}/DiagnosticReport?_count=1000")
    return [e["resource"] for e in b.get("entry", [])]


def accession_of(report):
    for o in report.get("basedOn", []):
        i = o.get("identifier", {})
        if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN":
            return i.get("value")
    return None


def one_film(i, ds, fhir, record, ae):
    acc, study = ds.AccessionNumber, ds.StudyInstanceUID
    seen = {}
    t0 = time.perf_counter()
    assoc = ae.associate(HOST, O_DICOM, ae_title="ORTHANC")
    if not assoc.is_established:
        raise RuntimeError("Orthanc refused the association")
    status = assoc.send_c_store(ds)
    assoc.release()
    if getattr(status, "Status", None) != 0:
        raise RuntimeError(f"C-STORE to Orthanc: {status}")
    stored = time.perf_counter() - t0
    deadline = t0 + A.timeout
    oru = report = None
    while len(seen) < 4:
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"film {i}: only {sorted(seen)} within {A.timeout} s")
        if "sr" not in seen or "sc" not in seen:
            mods = orthanc_modalities(study)
            for leg, m in (("sr", "SR"), ("sc", "OT")):
                if leg not in seen and m in mods:
                    seen[leg] = now - t0
        if "oru" not in seen:
            got = [m for m in orus(record) if m.get("fields", {}).get("obr_18") == acc]
            if got:
                seen["oru"], oru = now - t0, got
        if "dr" not in seen:
            got = [r for r in reports(fhir) if accession_of(r) == acc]
            if got:
                seen["dr"], report = now - t0, got
        time.sleep(A.poll)
    # The checks, once all four are there (a duplicate would show now).
    mods = orthanc_modalities(study)
    problems = []
    if sorted(mods) != ["CR", "OT", "SR"]:
        problems.append(f"study series {mods}")
    oru = [m for m in orus(record) if m.get("fields", {}).get("obr_18") == acc]
    report = [r for r in reports(fhir) if accession_of(r) == acc]
    if len(oru) != 1 or oru[0]["errors"]:
        problems.append(f"{len(oru)} ORU(s), errors {[m['errors'] for m in oru]}")
    if len(report) != 1:
        problems.append(f"{len(report)} DiagnosticReport(s)")
    if len(oru) == 1 and len(report) == 1:
        rid = [x["value"] for x in report[0]["identifier"] if x.get("use") == "secondary"][0]
        if oru[0]["fields"]["control_id"] != control_id(rid):
            problems.append(f"MSH-10 {oru[0]['fields']['control_id']} is not of result {rid}")
        if rid.split("/")[2] != ds.SOPInstanceUID:
            problems.append(f"result id {rid} is not of the film {ds.SOPInstanceUID}")
    for s in post(f"{ORTHANC}/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study},
                                            "Expand": True}):
        tags = get(f"{ORTHANC}/instances/{s['ID']}/simplified-tags")
        if tags.get("AccessionNumber") != acc:
            problems.append(f"{tags.get('Modality')} accession {tags.get('AccessionNumber')}")
    seen["stored"] = stored
    seen["model"] = next((x["value"] for m in oru for x in m["fields"]["obx"] if x["code"][0] == "cxr-model"), "?")
    return seen, problems


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    films = film_paths()
    datasets = [cr_dataset(i, f) for i, f in enumerate(films)]
    start_orthanc()
    fhir = start_fhir()
    record = os.path.join(WORK, "hl7.jsonl")
    spawn([sys.executable, os.path.join(ROOT, "tests", "hl7", "listener.py"), str(HL7), record], "listener")
    wait_port(HL7, "the MLLP listener")
    start_cxr(fhir)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    rows, failures = [], []
    for i, ds in enumerate(datasets):
        seen, problems = one_film(i, ds, fhir, record, ae)
        last = max(seen[k] for k in ("sr", "sc", "oru", "dr"))
        rows.append({**seen, "last": last})
        if problems:
            failures.append((i, problems))
        log(f"film {i:2d} {os.path.basename(films[i])}: last {last * 1000:7.1f} ms "
            + " ".join(f"{k} {seen[k] * 1000:.0f}" for k in ("stored", "sr", "sc", "oru", "dr"))
            + (f"  PROBLEMS {problems}" if problems else ""))
    last = [r["last"] for r in rows]
    ms = lambda x: f"{x * 1000:.0f} ms"
    print(f"### C-STORE through Orthanc to SR + SC in Orthanc, ORU at the RIS, DiagnosticReport on the FHIR server ({len(rows)} films)\n")
    print(f"- command: `.venv/bin/python bench/ris_e2e.py --films {A.films}` (cxr-serve `{os.path.relpath(A.bin, ROOT)}`, `--models-dir {os.path.relpath(A.models, ROOT)}`)")
    print(f"- CPU: {cpu_line()}")
    print(f"- model (the ORUs' OBX cxr-model): {', '.join(sorted({r['model'] for r in rows}))}")
    print(f"- to the last of the four: p50 {ms(pct(last, 0.5))}, p95 {ms(pct(last, 0.95))}, max {ms(max(last))}")
    print("\n| leg | median | p95 |\n|---|---|---|")
    for k, name in (("stored", "C-STORE to Orthanc answered"), ("sr", "SR in Orthanc"), ("sc", "SC in Orthanc"),
                    ("oru", "ORU at the MLLP listener"), ("dr", "DiagnosticReport on the FHIR server"),
                    ("last", "the last of the four")):
        xs = [r[k] for r in rows]
        print(f"| {name} | {ms(statistics.median(xs))} | {ms(pct(xs, 0.95))} |")
    last_leg = {}
    for r in rows:
        k = max(("sr", "sc", "oru", "dr"), key=lambda k: r[k])
        last_leg[k] = last_leg.get(k, 0) + 1
    print(f"\n- last to arrive: {', '.join(f'{k} {n}' for k, n in sorted(last_leg.items()))}")
    print(f"- checks: {len(rows) - len(failures)}/{len(rows)} films with one SR and one SC in the study, "
          "one valid ORU, one DiagnosticReport, the film's accession number in all, MSH-10 of the report's result id")
    for i, p in failures:
        print(f"  - film {i}: {p}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        for p in CHILDREN:
            p.terminate()
        for p in CHILDREN:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not A.keep:
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            log(f"kept {WORK}")
    sys.exit(rc)
