#!/usr/bin/env python3
"""Soak of the three doors at once beside a hostile mix, with a restart in the
middle (issue 43, "robustness round 3"). Not a test: it prints a Markdown block for
bench/RESULTS.md and exits non-zero when a check fails. Everything runs on
127.0.0.1; every loop is bounded in count and time; it stops by itself and kills
everything it started.

    .venv/bin/python bench/soak.py [--bin target/release/cxr-serve] [--minutes 10]
        [--models models] [--http-rate 1.5 --grpc-rate 1.0 --dicom-rate 0.5]
        [--reject-share 0.2] [--drain-timeout 300] [--server-arg=--flag --server-arg=value]

Needs, in .venv: pydicom, Pillow, numpy, tritonclient[grpc] (grpcio) and
**pynetdicom** (`.venv/bin/pip install pynetdicom`); Debian's `orthanc`.

What it starts (in a temp dir, removed at the end unless --keep):
- a real Orthanc (the PACS, C-STORE port and REST API);
- in front of it, in this process, a DICOM store SCP "the PACS gate" (pynetdicom,
  AE title PACS) that cxr-serve sends its results to (`--dicom-destination
  PACS@127.0.0.1:<gate>`): it refuses --reject-share of the objects (chosen by a
  hash of their SOP Instance UID, so a resend of the same object is refused again)
  with DIMSE status --reject-status (default 0xC000, "cannot understand": a
  permanent failure), and forwards the others to Orthanc by C-STORE, answering
  with Orthanc's status. (Orthanc 1.10's Lua `ReceivedInstanceFilter` drops an
  instance but still answers 0000 Success, and its C plugin SDK would need a
  compiled plugin: the gate is how this PACS "rejects a share".) Every refusal is
  recorded (SOP Instance UID, study, class), to be matched with the dead letters;
- cxr-serve with HTTP, --grpc-port, --dicom-port (peers file: MODALITY from
  127.0.0.1), the gate as destination, --dicom-outbox in the temp dir, an API keys
  file made with `cxr-serve --new-api-key` (scopes predict, models, admin) and
  --audit-log.

For --minutes, at once:
- legitimate load, paced: POST /predict (JPEG test films), gRPC ModelInfer
  (`image` BYTES input, key in `authorization` metadata) and DICOM C-STORE of CR
  instances made from the test films (pynetdicom, calling AE MODALITY, one
  association per instance, each a new study). A 503/429/RESOURCE_EXHAUSTED/
  UNAVAILABLE, a refused connection (the restart), A700 or a transient
  association rejection is retried after Retry-After (or 1 s), bounded; each
  retry is counted;
- a hostile mix on every door: the kinds that hold a socket open, at most
  --hostile-per-door per door at a time, each held at most --hostile-cap seconds;
  the quick kinds (refused at once, or oversized), at most 4 per door at a time:
  HTTP: slowloris (head trickled a byte a second), stalled body, idle connection,
  oversized body (declared 64 MiB, and chunked without a length), no key, a wrong key;
  gRPC (raw HTTP/2 where grpcio cannot misbehave): no key, a huge message (declared
  length 20 MiB or 200 MiB) stalled before its end, a complete 40 MiB message, a
  slow stream (a few bytes every 2 s), an idle connection (preface only);
  DICOM (raw PDUs): connect and send nothing, A-ASSOCIATE-RQ trickled a byte a
  second, unknown calling AE, wrong called AE, a command fragment that never ends,
  a P-DATA-TF declaring 1 GiB, an oversized data set (40 MiB CR, pynetdicom).
At --restart-at (default 50 %) cxr-serve gets SIGTERM, is waited for, and started
again on the same ports and outbox. RSS (VmRSS) is sampled every second: peak per run.

At the end it waits (at most --drain-timeout) for the outbox to drain, then checks:
1. every legitimate HTTP/gRPC request answered: 200, or a gate refusal
   (422 / FAILED_PRECONDITION), possibly after retries; none dropped after its
   connection was accepted, none left unanswered, no other status;
2. every legitimate DICOM instance acknowledged (0000, or a B-warning), none
   left unanswered on an established association;
3. every acknowledged instance's results (SR + SC when analysed, SR when not, per
   the audit log) are in Orthanc, or dead-lettered with a reason (matched in the
   dead-letter route by the result's SOP Instance UID, the source's SOP Instance
   UID or its study; without the route, only in aggregate from /metrics);
4. the same for the instances acknowledged before the restart (nothing lost);
5. the server exits on SIGTERM within --exit-timeout, and never dies otherwise;
   the outbox is drained (depth 0); the RSS peak stays under --rss-limit-mb.
and reports the RSS peaks, the legit answers' latency (retries included) and, per
hostile kind, how many were sent and how each ended (status, RST_STREAM, gRPC
trailers, A-ASSOCIATE-RJ, A-ABORT, closed by the server after N s, or "held to
cap": not refused within --hostile-cap; an INFO row, not a check).

The names a hardened build is expected to use (the dead-letter outcome of
cxr_dicom_results_total, the dead-letter admin route, the reason field) are
constants at the top of the file; /metrics is read generically (every sample of a
counter summed by its `outcome` label, over the server runs: each run starts at 0).
"""
import argparse, collections, glob, hashlib, http.client, io, json, logging, os, random, re
import shutil, signal, socket, struct, subprocess, sys, tempfile, threading, time, urllib.request

# ---- names the hardened build is expected to use (adjust here) ---------------------
RESULTS_METRIC = "cxr_dicom_results_total"         # {destination, outcome}
DEAD_OUTCOMES = ("dead_letter", "dead_lettered", "dead")
SENT_OUTCOMES = ("sent",)
DEPTH_METRIC = "cxr_dicom_outbox_depth"             # {destination}
STORES_METRIC = "cxr_dicom_stores_total"            # {outcome}
ASSOC_METRIC = "cxr_dicom_associations_total"       # {outcome}
DEAD_LETTER_ROUTES = ("/dicom/outbox/dead-letters", "/dicom/dead-letters", "/dicom/outbox?state=dead")
REASON_KEYS = ("reason", "error", "why", "cause")     # a dead letter's reason: a non-empty string under
                                                    # a key containing one of these
# ---------------------------------------------------------------------------------------

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
HOST = "127.0.0.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
              "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34")
SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4")

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cxr-serve"))
ap.add_argument("--minutes", type=float, default=10)
ap.add_argument("--models", default=os.path.join(ROOT, "models"))
ap.add_argument("--model", default=None, help="--default-model for the server (default: the server's)")
ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "chest_xray_224"))
ap.add_argument("--http-rate", type=float, default=1.5, help="legit POST /predict per second")
ap.add_argument("--grpc-rate", type=float, default=1.0, help="legit gRPC ModelInfer per second")
ap.add_argument("--dicom-rate", type=float, default=0.5, help="legit C-STORE instances per second")
ap.add_argument("--clients", type=int, default=2, help="legit client threads per door")
ap.add_argument("--hostile-per-door", type=int, default=12, help="hostile sockets per door at once")
ap.add_argument("--hostile-cap", type=float, default=60, help="longest a hostile client holds on, s")
ap.add_argument("--no-hostile", action="store_true")
ap.add_argument("--reject-share", type=float, default=0.2)
ap.add_argument("--reject-status", type=lambda s: int(s, 0), default=0xC000)
ap.add_argument("--restart-at", type=float, default=0.5, help="share of --minutes; 0: no restart")
ap.add_argument("--ready-timeout", type=float, default=300)
ap.add_argument("--exit-timeout", type=float, default=150, help="longest a SIGTERMed server may take to exit")
ap.add_argument("--drain-timeout", type=float, default=300)
ap.add_argument("--request-deadline", type=float, default=300, help="longest a legit request keeps retrying, s")
ap.add_argument("--rss-limit-mb", type=float, default=2048, help="the RSS check's bound")
ap.add_argument("--server-arg", action="append", default=[], help="extra cxr-serve argument (repeat)")
ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, outbox, audit log)")
ap.add_argument("--seed", type=int, default=43)
A = ap.parse_args()

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import cpu_line, free_port  # noqa: E402

try:
    from pynetdicom import AE, evt  # noqa: E402
    from pynetdicom.sop_class import Verification  # noqa: E402
except ImportError:
    sys.exit("pynetdicom is needed: .venv/bin/pip install pynetdicom")

LOCK = threading.Lock()
STOP = threading.Event()        # end of the load phase
T0 = time.time()
CHILDREN = []                   # every process started, killed at exit


def now():
    return time.time() - T0


def log(*a):
    print(f"[{now():7.1f}s]", *a, file=sys.stderr, flush=True)


# ---- films ---------------------------------------------------------------------------
films = sorted(glob.glob(os.path.join(A.data, "test", "*", "*.jpeg")) +
               glob.glob(os.path.join(A.data, "test", "*", "*.png")))
if not films:
    sys.exit(f"no test films under {A.data}/test")
random.Random(A.seed).shuffle(films)
BODIES = [open(f, "rb").read() for f in films[:200]]
PIXELS = [np.asarray(Image.open(f).convert("L")) for f in films[:80]]


def cr_dataset(i):
    """A CR (8-bit MONOCHROME2, PA chest) of test film i, in a new study."""
    px = PIXELS[i % len(PIXELS)]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SOAK^TEST", f"SOAK-{i:05d}", "20220101", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20261207", "120000", f"S{i}", ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientOrientation = ["R", "F"]
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 256
    ds.PixelData = px.tobytes()
    return ds


# ---- Orthanc and the PACS gate --------------------------------------------------------
WORK = tempfile.mkdtemp(prefix="cxr-soak-")
O_HTTP, O_DICOM, GATE, P_HTTP, P_GRPC, P_DICOM = (free_port() for _ in range(6))


def start_orthanc():
    db = os.path.join(WORK, "orthanc-db")
    os.makedirs(db)
    cfg = {"Name": "soak-pacs", "StorageDirectory": db, "IndexDirectory": db, "HttpPort": O_HTTP,
           "DicomPort": O_DICOM, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
           "HttpTimeout": 60, "ConcurrentJobs": 1}
    plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    if os.path.exists(plugin):
        cfg["Plugins"] = [plugin]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    path = os.path.join(WORK, "orthanc.json")
    json.dump(cfg, open(path, "w"))
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    p = subprocess.Popen([exe, path], stdout=open(os.path.join(WORK, "orthanc.log"), "w"),
                         stderr=subprocess.STDOUT)
    CHILDREN.append(p)
    deadline = time.time() + 30
    while time.time() < deadline:
        if orthanc_get("/system") is not None:
            return p
        time.sleep(0.2)
    sys.exit("Orthanc did not start in 30 s")


def orthanc_get(path):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{O_HTTP}{path}", timeout=60) as r:
            return json.loads(r.read())
    except Exception:
        return None


GATE_LOG = []   # (t, sop, study, class, refused, status)


def refused_by_gate(sop):
    return int(hashlib.sha256(sop.encode()).hexdigest(), 16) % 10000 < A.reject_share * 10000


def start_gate():
    fwd = AE(ae_title="PACSGATE")
    for cls in SR_CLASSES + SC_CLASSES + (CR,):
        fwd.add_requested_context(cls, ExplicitVRLittleEndian)
        fwd.add_requested_context(cls, ImplicitVRLittleEndian)
    fwd.acse_timeout = fwd.dimse_timeout = fwd.network_timeout = 60

    def on_store(event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop, study, cls = str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", "")), str(ds.SOPClassUID)
        except Exception:
            return 0xC001
        if refused_by_gate(sop):
            with LOCK:
                GATE_LOG.append((now(), sop, study, cls, True, A.reject_status))
            return A.reject_status
        status = 0xA700
        try:
            a = fwd.associate(HOST, O_DICOM, ae_title="ORTHANC")
            if a.is_established:
                st = a.send_c_store(ds)
                status = int(st.Status) if st and "Status" in st else 0xA700
                a.release()
        except Exception:
            status = 0xA700
        with LOCK:
            GATE_LOG.append((now(), sop, study, cls, False, status))
        return status

    scp = AE(ae_title="PACS")
    for cls in SR_CLASSES + SC_CLASSES + (CR,):
        scp.add_supported_context(cls, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    scp.add_supported_context(Verification)
    scp.maximum_associations = 32
    return scp.start_server((HOST, GATE), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


# ---- cxr-serve ---------------------------------------------------------------------
KEY = None
RUNS = []   # dicts: proc, started, ready, sigterm, exited, rc, rss_peak, hwm


def make_keys():
    global KEY
    out = subprocess.run([A.bin, "--new-api-key", "soak"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(f"--new-api-key failed: {out.stderr}")
    KEY = re.search(r"key:\s*(\S+)", out.stdout).group(1)
    entry = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("#"))
    entry = re.sub(r"scopes\s*=\s*\[.*\]", 'scopes = ["predict", "models", "admin"]', entry)
    path = os.path.join(WORK, "keys.toml")
    open(path, "w").write(entry + "\n")
    return path


def server_cmd(keys):
    peers = os.path.join(WORK, "peers.toml")
    open(peers, "w").write('[[peers]]\nae_title = "MODALITY"\nhosts = ["127.0.0.1"]\n')
    cmd = [A.bin, "--host", HOST, "--port", str(P_HTTP), "--grpc-port", str(P_GRPC),
           "--dicom-port", str(P_DICOM), "--dicom-ae-title", "CXR", "--dicom-peers-file", peers,
           "--dicom-destination", f"PACS@{HOST}:{GATE}",
           "--dicom-outbox", os.path.join(WORK, "outbox.sqlite"),
           "--api-keys-file", keys, "--audit-log", os.path.join(WORK, "audit.jsonl"),
           "--models-dir", A.models, "--device", "cpu", "--log-format", "json"]
    if A.model:
        cmd += ["--default-model", A.model]
    return cmd + A.server_arg


def rss_sampler(run):
    pid = run["proc"].pid
    while run["proc"].poll() is None:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    run["rss_peak"] = max(run["rss_peak"], int(line.split()[1]) / 1024)
                elif line.startswith("VmHWM:"):
                    run["hwm"] = int(line.split()[1]) / 1024
        except OSError:
            break
        time.sleep(1.0)


def start_server(cmd):
    n = len(RUNS) + 1
    logf = open(os.path.join(WORK, f"server-{n}.log"), "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    CHILDREN.append(p)
    run = {"n": n, "proc": p, "started": now(), "ready": None, "sigterm": None, "exited": None, "rc": None,
           "rss_peak": 0.0, "hwm": 0.0, "metrics": None}
    RUNS.append(run)
    threading.Thread(target=rss_sampler, args=(run,), daemon=True).start()
    deadline = time.time() + A.ready_timeout
    while time.time() < deadline and p.poll() is None:
        s, _, _ = http_req("GET", "/ready", timeout=5)
        if s == 200:
            run["ready"] = now()
            log(f"cxr-serve run {n} ready after {run['ready'] - run['started']:.1f} s (pid {p.pid})")
            return run
        time.sleep(0.5)
    sys.exit(f"cxr-serve run {n} did not get ready (rc {p.poll()}); see {logf.name}")


def stop_server(run):
    p = run["proc"]
    run["metrics"] = metrics()   # counters restart at 0 with the next run
    run["sigterm"] = now()
    p.send_signal(signal.SIGTERM)
    try:
        run["rc"] = p.wait(timeout=A.exit_timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        run["rc"] = f"killed after {A.exit_timeout:.0f} s"
        p.wait()
    run["exited"] = now()
    log(f"cxr-serve run {run['n']} exited {run['rc']} {run['exited'] - run['sigterm']:.1f} s after SIGTERM")


def http_req(method, path, body=b"", headers=None, timeout=60):
    """(status, headers, body) on a fresh connection; status 0 with the error otherwise."""
    c = http.client.HTTPConnection(HOST, P_HTTP, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    except Exception as e:
        return 0, {}, e
    finally:
        c.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def metrics():
    s, _, b = http_req("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=20)
    out = collections.defaultdict(float)
    if s != 200:
        return None
    for line in b.decode(errors="replace").splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\d.eE]+|NaN)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), tuple(sorted(labels.items())))] += float(m.group(3))
    return out


def by_label(ms, name, label):
    agg = collections.Counter()
    for (n, labels), v in (ms or {}).items():
        if n == name:
            agg[dict(labels).get(label, "")] += v
    return dict(agg)


def over_runs(name, label):
    """A counter summed over every server run (each starts again at 0), by `label`."""
    agg = collections.Counter()
    for r in RUNS:
        for k, v in by_label(r["metrics"], name, label).items():
            agg[k] += v
    return dict(agg)


# ---- legitimate clients --------------------------------------------------------------
LEGIT = {d: collections.Counter() for d in ("http", "grpc", "dicom")}
FAILS = {d: [] for d in ("http", "grpc", "dicom")}
ACKED = []   # (t_ack, run_n, sop, study)


LATENCY = {d: [] for d in ("http", "grpc", "dicom")}   # first try to answer, retries included


def count(door, what, n=1):
    with LOCK:
        LEGIT[door][what] += n


def took(door, t0):
    with LOCK:
        LATENCY[door].append((t0 - T0, time.time() - t0))


def paced(door, rate, fn):
    period = A.clients / rate
    def loop(c):
        i, nxt = c, time.time() + random.random() * period
        while not STOP.is_set():
            time.sleep(max(0, nxt - time.time()))
            if STOP.is_set():
                break
            nxt = max(nxt + period, time.time())
            try:
                fn(i)
            except Exception as e:  # a bug in the client, not the server: keep it visible
                count(door, "client_error")
                with LOCK:
                    FAILS[door].append(f"client error {e!r}")
            i += A.clients
    return [threading.Thread(target=loop, args=(c,), daemon=True) for c in range(A.clients)]


def legit_http(i):
    body = BODIES[i % len(BODIES)]
    count("http", "sent")
    t0 = time.time()
    deadline, tries = time.time() + A.request_deadline, 0
    while time.time() < deadline:
        tries += 1
        s, h, b = http_req("POST", "/predict", body,
                           {"Content-Type": "image/jpeg", "Authorization": f"Bearer {KEY}"}, timeout=120)
        if s in (200, 422):
            count("http", "answered" if s == 200 else "answered_422")
            took("http", t0)
            if tries > 1:
                count("http", "answered_after_retry")
            return
        if s in (503, 429):
            count("http", f"retried_{s}")
            ra = h.get("Retry-After") or h.get("retry-after") or "1"
            time.sleep(min(10, float(ra) if ra.replace(".", "").isdigit() else 1))
            continue
        if s == 0 and isinstance(b, ConnectionRefusedError):
            count("http", "retried_conn_refused")
            time.sleep(0.5)
            continue
        if s == 0:
            count("http", "dropped")   # accepted, then no answer
            with LOCK:
                FAILS["http"].append(f"t={now():.0f}s no answer: {b!r}"[:200])
            time.sleep(0.5)
            continue
        count("http", f"status_{s}")
        with LOCK:
            FAILS["http"].append(f"t={now():.0f}s {s} {b[:160]!r}")
        return
    count("http", "unanswered")


_grpc_local = threading.local()


def legit_grpc(i):
    body = BODIES[(i * 7 + 3) % len(BODIES)]
    count("grpc", "sent")
    if not hasattr(_grpc_local, "stub"):
        ch = grpc.insecure_channel(f"{HOST}:{P_GRPC}", options=[("grpc.max_receive_message_length", 64 << 20)])
        _grpc_local.stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    req = service_pb2.ModelInferRequest(model_name=A.model or "weighted")
    if not A.model:
        req.model_name = DEFAULT_MODEL
    t = req.inputs.add()
    t.name, t.datatype = "image", "BYTES"
    t.shape.append(1)
    t.contents.bytes_contents.append(body)
    req.outputs.add().name = "probabilities"
    t0 = time.time()
    deadline, tries = time.time() + A.request_deadline, 0
    while time.time() < deadline:
        tries += 1
        try:
            _grpc_local.stub.ModelInfer(req, metadata=[("authorization", f"Bearer {KEY}")], timeout=120)
            count("grpc", "answered")
            took("grpc", t0)
            if tries > 1:
                count("grpc", "answered_after_retry")
            return
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                count("grpc", "answered_failed_precondition")
                took("grpc", t0)
                return
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                md = dict(e.trailing_metadata() or ())
                details = (e.details() or "").lower()
                if code == grpc.StatusCode.UNAVAILABLE and "retry-after" not in md and not any(
                        w in details for w in ("connect", "refused", "not_ready", "not ready", "shutting")):
                    count("grpc", "dropped")   # in flight when it broke, no retry-after
                    with LOCK:
                        FAILS["grpc"].append(f"t={now():.0f}s UNAVAILABLE {e.details()!r}"[:200])
                else:
                    count("grpc", f"retried_{code.name}")
                ra = md.get("retry-after", "1")
                time.sleep(min(10, float(ra) if str(ra).replace(".", "").isdigit() else 1))
                continue
            count("grpc", f"status_{code.name}")
            with LOCK:
                FAILS["grpc"].append(f"t={now():.0f}s {code.name} {e.details()!r}"[:200])
            return
    count("grpc", "unanswered")


_dicom_ae = AE(ae_title="MODALITY")
_dicom_ae.add_requested_context(CR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
_dicom_ae.acse_timeout = _dicom_ae.dimse_timeout = _dicom_ae.network_timeout = 120


def legit_dicom(i):
    ds = cr_dataset(i)
    count("dicom", "sent")
    t0 = time.time()
    deadline, tries = time.time() + A.request_deadline, 0
    while time.time() < deadline:
        tries += 1
        try:
            a = _dicom_ae.associate(HOST, P_DICOM, ae_title="CXR")
        except Exception as e:
            count("dicom", "retried_connect_error")
            time.sleep(1)
            continue
        if not a.is_established:
            count("dicom", "retried_rejected" if a.is_rejected else "retried_no_association(server down)")
            time.sleep(1)
            continue
        try:
            st = a.send_c_store(ds)
        except Exception as e:
            st = None
        status = int(st.Status) if st is not None and "Status" in st else None
        try:
            if a.is_established:
                a.release()
        except Exception:
            pass
        if status is None:
            # The association was up and the C-STORE sent: no response is a dropped
            # request (a draining node answers what it took), retried all the same.
            count("dicom", "dropped")
            with LOCK:
                FAILS["dicom"].append(f"t={now():.0f}s association ended with the C-STORE unanswered")
            time.sleep(1)
            continue
        if status == 0 or (status & 0xF000) == 0xB000:
            count("dicom", "acknowledged" if status == 0 else f"acknowledged_{status:04X}")
            took("dicom", t0)
            if tries > 1:
                count("dicom", "acknowledged_after_retry")
            with LOCK:
                ACKED.append((now(), RUNS[-1]["n"], str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)))
            return
        if (status & 0xFF00) == 0xA700:
            count("dicom", "retried_A700")
            time.sleep(2)
            continue
        count("dicom", f"status_{status:04X}")
        with LOCK:
            FAILS["dicom"].append(f"t={now():.0f}s C-STORE status {status:04X}")
        return
    count("dicom", "unanswered")


# ---- hostile clients ---------------------------------------------------------------
HOSTILE = collections.defaultdict(collections.Counter)   # kind -> outcome -> n
ACTIVE = collections.Counter()                            # door -> sockets open


def outcome(kind, what):
    with LOCK:
        HOSTILE[kind][what] += 1


def restart_window(t0, t1):
    """Whether [t0, t1] (seconds since start) overlaps a server stop."""
    for r in RUNS:
        if r["sigterm"] is not None and t0 <= (r["exited"] or now()) + 1 and t1 >= r["sigterm"]:
            return True
    return False


def watch(sock, kind, t0, cap, send=None):
    """Reads until the server closes or the cap; `send` is called every second while
    the socket is open (a trickle). Records how it ended."""
    sock.settimeout(1.0)
    data, end, err = b"", time.time() + cap, None
    try:
        while time.time() < end:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 1 << 16:
                    break
            except socket.timeout:
                if send:
                    try:
                        send()
                    except OSError:
                        break
                continue
        else:
            outcome(kind, "held to cap")
            return data
    except OSError as e:
        err = type(e).__name__
    took = time.time() - t0
    ts = (t0 - T0, now())
    if restart_window(*ts):
        what = "cut by the restart"
    elif data.startswith(b"HTTP/"):
        what = f"HTTP {data.split(b' ', 2)[1].decode(errors='replace')}"
    elif kind.startswith("dicom") and data[:1] and data[0] in PDU_NAMES:
        what = PDU_NAMES[data[0]]
    elif data:
        what = f"{data[:12]!r}… then closed"
    elif err:
        what = f"closed ({err})"
    else:
        what = "closed"
    outcome(kind, f"{what} after {bucket(took)}")
    return data


def bucket(s):
    for lim in (1, 5, 15, 35, 65, 125):
        if s < lim:
            return f"<{lim} s"
    return ">=125 s"


def connect(port):
    return socket.create_connection((HOST, port), timeout=10)


def h_slowloris():
    s = connect(P_HTTP)
    head = iter(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n" + b"X-Pad: " + b"a" * 200)
    watch(s, "http slowloris (head 1 B/s)", time.time(), A.hostile_cap,
          send=lambda: s.send(bytes([next(head, 97)])))
    s.close()


def h_stalled_body():
    s = connect(P_HTTP)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Length: 200000\r\n\r\n".encode() + BODIES[0][:1000])
    watch(s, "http stalled body", time.time(), A.hostile_cap)
    s.close()


def h_idle():
    s = connect(P_HTTP)
    watch(s, "http idle connection", time.time(), A.hostile_cap)
    s.close()


def h_oversized(chunked):
    kind = "http oversized body (chunked)" if chunked else "http oversized body (64 MiB declared)"
    s = connect(P_HTTP)
    t0 = time.time()
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nAuthorization: Bearer {KEY}\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {64 << 20}\r\n") + "\r\n")
    chunk = b"\xff" * (1 << 16)
    if chunked:
        chunk = b"10000\r\n" + chunk + b"\r\n"
    try:
        s.sendall(head.encode())
        s.settimeout(0.05)
        for _ in range(1024):   # at most 64 MiB
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break
            except socket.timeout:
                pass
            s.settimeout(10)
            s.sendall(chunk)
            s.settimeout(0.05)
            if time.time() - t0 > A.hostile_cap:
                break
    except OSError:
        pass
    watch(s, kind, t0, 15)
    s.close()


def h_key(bad):
    kind = "http wrong key" if bad else "http no key"
    hd = {"Content-Type": "image/jpeg"}
    if bad:
        hd["Authorization"] = "Bearer cxr_" + "0" * 64
    s, _, b = http_req("POST", "/predict", BODIES[1], hd, timeout=30)
    if not s and isinstance(b, ConnectionRefusedError):
        outcome(kind, "connection refused (server down)")
    else:
        outcome(kind, f"HTTP {s}" if s else f"no answer ({type(b).__name__})")


def h2_frame(t, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload


def hpack_int(n):
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    return bytes(out + [n])


def hpack(headers):
    return b"".join(b"\x00" + hpack_int(len(k)) + k.encode() + hpack_int(len(v)) + v.encode() for k, v in headers)


def h2_open(key=True):
    s = connect(P_GRPC)
    hs = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
          (":authority", f"{HOST}:{P_GRPC}"), ("content-type", "application/grpc"), ("te", "trailers")]
    if key:
        hs.append(("authorization", f"Bearer {KEY}"))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") + h2_frame(1, 4, 1, hpack(hs)))
    return s


def h2_watch(s, kind, t0, cap, trickle=None, answer_pings=True):
    """Reads HTTP/2 frames until the stream or connection ends, or the cap."""
    s.settimeout(1.0)
    buf, end, what = b"", time.time() + cap, None
    while time.time() < end and what is None:
        try:
            chunk = s.recv(65536)
            if not chunk:
                what = "closed"
                break
            buf += chunk
        except socket.timeout:
            if trickle:
                try:
                    trickle()
                except OSError:
                    what = "closed"
            continue
        except OSError:
            what = "closed"
            break
        while len(buf) >= 9 and what is None:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            t, fl, sid, pl = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]
            buf = buf[9 + n:]
            try:
                if t == 4 and not fl & 1:
                    s.sendall(h2_frame(4, 1, 0, b""))
                elif t == 6 and not fl & 1 and answer_pings:
                    s.sendall(h2_frame(6, 1, 0, pl))
            except OSError:
                pass
            if t == 3 and sid == 1:
                what = f"RST_STREAM({int.from_bytes(pl[:4], 'big')})"
            elif t == 1 and sid == 1 and fl & 1:
                what = "trailers (gRPC status)"
            elif t == 7:
                what = f"GOAWAY({int.from_bytes(pl[4:8], 'big')})"
    if what is None:
        outcome(kind, "held to cap")
        return
    if restart_window(t0 - T0, now()):
        what = "cut by the restart"
    outcome(kind, f"{what} after {bucket(time.time() - t0)}")


def g_huge_stalled():
    declared = random.choice((20 << 20, 200 << 20))
    kind = f"grpc {declared >> 20} MiB message stalled"
    s = h2_open()
    t0 = time.time()
    s.sendall(h2_frame(0, 0, 1, b"\x00" + struct.pack(">I", declared) + b"\x00" * 16000))
    h2_watch(s, kind, t0, A.hostile_cap, answer_pings=False)
    s.close()


def g_slow_stream():
    s = h2_open()
    t0 = time.time()
    s.sendall(h2_frame(0, 0, 1, b"\x00" + struct.pack(">I", 1 << 20)))
    tick = [0]

    def trickle():
        tick[0] += 1
        if tick[0] % 2 == 0:
            s.sendall(h2_frame(0, 0, 1, b"\x00" * 8))
    h2_watch(s, "grpc slow stream (8 B / 2 s)", t0, A.hostile_cap, trickle=trickle)
    s.close()


def g_idle():
    s = connect(P_GRPC)
    t0 = time.time()
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
    h2_watch(s, "grpc idle connection (preface only)", t0, A.hostile_cap, answer_pings=False)
    s.close()


def g_no_key():
    ch = grpc.insecure_channel(f"{HOST}:{P_GRPC}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    req = service_pb2.ModelInferRequest(model_name=DEFAULT_MODEL)
    t = req.inputs.add()
    t.name, t.datatype = "image", "BYTES"
    t.shape.append(1)
    t.contents.bytes_contents.append(BODIES[2])
    try:
        stub.ModelInfer(req, timeout=30)
        outcome("grpc no key", "OK (not refused)")
    except grpc.RpcError as e:
        outcome("grpc no key", e.code().name)
    ch.close()


def g_oversized():
    """A complete 40 MiB ModelInfer message (over --max-body-bytes' default 32 MiB)."""
    ch = grpc.insecure_channel(f"{HOST}:{P_GRPC}", options=[("grpc.max_send_message_length", 64 << 20)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    req = service_pb2.ModelInferRequest(model_name=DEFAULT_MODEL)
    t = req.inputs.add()
    t.name, t.datatype = "image", "BYTES"
    t.shape.append(1)
    t.contents.bytes_contents.append(b"\xff" * (40 << 20))
    t0 = time.time()
    try:
        stub.ModelInfer(req, metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
        what = "OK (not refused)"
    except grpc.RpcError as e:
        what = e.code().name
    outcome("grpc oversized message (40 MiB, complete)", f"{what} after {bucket(time.time() - t0)}")
    ch.close()


def pdu_item(t, payload):
    return bytes([t, 0]) + struct.pack(">H", len(payload)) + payload


def assoc_rq(calling, called="CXR"):
    pc = pdu_item(0x20, bytes([1, 0, 0, 0]) + pdu_item(0x30, CR.encode()) + pdu_item(0x40, EXPLICIT.encode()))
    ui = pdu_item(0x50, pdu_item(0x51, struct.pack(">I", 16384)) + pdu_item(0x52, b"1.2.826.0.1.3680043.9.43.1"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
            + pdu_item(0x10, b"1.2.840.10008.3.1.1.1") + pc + ui)
    return bytes([1, 0]) + struct.pack(">I", len(body)) + body


def read_pdu(s, timeout=30):
    s.settimeout(timeout)
    head = b""
    while len(head) < 6:
        c = s.recv(6 - len(head))
        if not c:
            return None, b""
        head += c
    n = struct.unpack(">I", head[2:6])[0]
    body = b""
    while len(body) < min(n, 1 << 16):
        c = s.recv(n - len(body))
        if not c:
            break
        body += c
    return head[0], body


PDU_NAMES = {2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 7: "A-ABORT", 6: "A-RELEASE-RP", 4: "P-DATA-TF"}


def d_unknown(calling, called, kind):
    s = connect(P_DICOM)
    try:
        s.sendall(assoc_rq(calling, called))
        t, body = read_pdu(s)
        what = PDU_NAMES.get(t, f"PDU {t}") if t else "closed"
        if t == 3 and len(body) >= 4:
            what += f" (result {body[1]}, source {body[2]}, reason {body[3]})"
        if t == 2:
            what += " (accepted!)"
        outcome(kind, what)
    except OSError as e:
        outcome(kind, f"error {type(e).__name__}")
    finally:
        s.close()


def d_idle():
    s = connect(P_DICOM)
    watch(s, "dicom connect, send nothing", time.time(), A.hostile_cap)
    s.close()


def d_trickle():
    s = connect(P_DICOM)
    rq = iter(assoc_rq("MODALITY"))
    watch(s, "dicom A-ASSOCIATE-RQ 1 B/s", time.time(), A.hostile_cap,
          send=lambda: s.send(bytes([next(rq)])))
    s.close()


def d_after_ac(kind, payload):
    s = connect(P_DICOM)
    try:
        s.sendall(assoc_rq("MODALITY"))
        t, _ = read_pdu(s)
        if t != 2:
            outcome(kind, f"association not accepted ({PDU_NAMES.get(t, t)})")
            return
        t0 = time.time()
        s.sendall(payload)
        watch(s, kind, t0, A.hostile_cap)
    except OSError as e:
        outcome(kind, f"error {type(e).__name__}")
    finally:
        s.close()


def d_fragment():
    # A C-STORE-RQ command PDV that is not the last fragment, and nothing after it.
    cmd = struct.pack("<HHI", 0, 2, 26) + CR.encode() + b"\0" * (26 - len(CR))
    pdv = struct.pack(">I", len(cmd) + 2) + bytes([1, 0x01]) + cmd
    d_after_ac("dicom command fragment never ended", bytes([4, 0]) + struct.pack(">I", len(pdv)) + pdv)


def d_huge_pdu():
    d_after_ac("dicom P-DATA-TF declaring 1 GiB",
               bytes([4, 0]) + struct.pack(">I", 1 << 30) + struct.pack(">I", (1 << 30) - 4) + bytes([1, 0]) +
               b"\0" * 65536)


_big_ae = AE(ae_title="MODALITY")
_big_ae.add_requested_context(CR, ExplicitVRLittleEndian)
_big_ae.acse_timeout = _big_ae.dimse_timeout = _big_ae.network_timeout = 60


def d_oversized():
    kind = "dicom oversized data set (40 MiB CR)"
    ds = cr_dataset(0)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4096, 5120, 16, 12, 11
    ds.PixelData = bytes(4096 * 5120 * 2)
    try:
        a = _big_ae.associate(HOST, P_DICOM, ae_title="CXR")
    except Exception as e:
        outcome(kind, f"error {type(e).__name__}")
        return
    if not a.is_established:
        outcome(kind, "association rejected" if a.is_rejected else "no association")
        return
    t0 = time.time()
    try:
        st = a.send_c_store(ds)
    except Exception as e:
        st = e
    if a.is_aborted:
        what = "A-ABORT"
    elif isinstance(st, Exception):
        what = f"client error {type(st).__name__}: {st}"[:80]
    elif st is not None and "Status" in st:
        what = f"status {int(st.Status):04X}"
    else:
        what = "no C-STORE response (connection closed or aborted)"
    try:
        if a.is_established:
            a.release()
    except Exception:
        pass
    outcome(kind, f"{what} after {bucket(time.time() - t0)}")


HOSTILE_KINDS = [  # (door, every s, function, held: holds its socket open, counted against --hostile-per-door)
    ("http", 4, h_slowloris, True), ("http", 6, h_stalled_body, True), ("http", 8, h_idle, True),
    ("http", 15, lambda: h_oversized(False), False), ("http", 20, lambda: h_oversized(True), True),
    ("http", 3, lambda: h_key(False), False), ("http", 5, lambda: h_key(True), False),
    ("grpc", 3, g_no_key, False), ("grpc", 6, g_huge_stalled, True), ("grpc", 6, g_slow_stream, True),
    ("grpc", 8, g_idle, True), ("grpc", 20, g_oversized, False),
    ("dicom", 6, d_idle, True), ("dicom", 6, d_trickle, True),
    ("dicom", 3, lambda: d_unknown("STRANGER", "CXR", "dicom unknown calling AE"), False),
    ("dicom", 10, lambda: d_unknown("MODALITY", "NOTCXR", "dicom wrong called AE"), False),
    ("dicom", 8, d_fragment, True), ("dicom", 10, d_huge_pdu, False), ("dicom", 30, d_oversized, False),
]
QUICK_PER_DOOR = 4   # quick kinds (a refusal expected at once) at a time per door, beside the held ones
HOSTILE_THREADS = []


def hostile_launcher(door, every, fn, held, offset):
    slot = door if held else door + " quick"
    cap = A.hostile_per_door if held else QUICK_PER_DOOR
    time.sleep(offset)
    while not STOP.is_set():
        with LOCK:
            ok = ACTIVE[slot] < cap
            if ok:
                ACTIVE[slot] += 1
        if ok:
            def run():
                try:
                    fn()
                except ConnectionRefusedError:
                    outcome(f"{door} (any kind)", "connection refused (server down)")
                except Exception as e:
                    outcome(f"{door} (any kind)", f"client error {type(e).__name__}")
                finally:
                    with LOCK:
                        ACTIVE[slot] -= 1
            t = threading.Thread(target=run, daemon=True)
            t.start()
            with LOCK:
                HOSTILE_THREADS.append(t)
        STOP.wait(every)


# ---- accounting at the end -----------------------------------------------------------
def dead_letters():
    for route in DEAD_LETTER_ROUTES:
        s, _, b = http_req("GET", route, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        if s == 200:
            try:
                v = json.loads(b)
            except ValueError:
                continue
            if isinstance(v, dict):
                lists = [x for x in v.values() if isinstance(x, list)]
                v = lists[0] if lists else [v]
            return route, v
    return None, None


def entry_reason(e):
    if not isinstance(e, dict):
        return None
    for k, v in e.items():
        if any(r in k.lower() for r in REASON_KEYS) and isinstance(v, str) and v.strip():
            return v
    return None


def orthanc_index():
    """Study Instance UID -> [(Modality, SOP Instance UID)] of everything in Orthanc."""
    studies = orthanc_get("/studies?expand") or []
    series = {s["ID"]: s for s in orthanc_get("/series?expand") or []}
    insts = {i["ID"]: i for i in orthanc_get("/instances?expand") or []}
    out = collections.defaultdict(list)
    for st in studies:
        uid = st["MainDicomTags"].get("StudyInstanceUID")
        for sid in st.get("Series", []):
            se = series.get(sid, {})
            mod = se.get("MainDicomTags", {}).get("Modality", "")
            for iid in se.get("Instances", []):
                out[uid].append((mod, insts.get(iid, {}).get("MainDicomTags", {}).get("SOPInstanceUID")))
    return out


def audit_decisions(sops):
    """SOP Instance UID -> the audit record's decision, for the sources in `sops`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(WORK, "audit.jsonl*"))):
        for line in open(path, errors="replace"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            flat = json.dumps(r)
            for m in re.findall(r'"([0-9.]{10,64})"', flat):
                if m in sops and r.get("decision") in ("answered", "refused"):
                    out[m] = r["decision"]
    return out


def account(sources, decisions, index, gate_log, dls, refused_ok, restart_t):
    """Each acknowledged source's expected results (SR + SC when the audit says
    answered, else SR) against what Orthanc holds, the dead letters (each entry
    accounts for one object: matched by a result SOP Instance UID the PACS refused,
    else by the source's SOP Instance UID or study, of the same kind when the entry
    names a SOP class) and, without a dead-letter route, the aggregate."""
    gate_refused = {}
    for t, sop, study, cls, refused, status in gate_log:
        if refused:
            st, c, k = gate_refused.get(sop, (study, cls, 0))
            gate_refused[sop] = (st, c, k + 1)
    refused_by_study = collections.defaultdict(list)
    for sop, (study, cls, k) in gate_refused.items():
        refused_by_study[study].append((sop, cls))
    dl_text = [(json.dumps(e), entry_reason(e)) for e in (dls or [])]
    used = set()
    acct = collections.Counter()
    lost, lost_before = [], []
    for sop, (t, n, study) in sources.items():
        kinds_filed = collections.Counter("SC" if m == "OT" else m for m, _ in index.get(study, []))
        expected = ["SR", "SC"] if decisions.get(sop) == "answered" else ["SR"]
        if sop not in decisions:
            acct["no audit record"] += 1
        missing = []
        for k in expected:
            if kinds_filed.get(k):
                acct[f"{k} filed"] += 1
                continue
            mine, other = (SR_CLASSES, SC_CLASSES) if k == "SR" else (SC_CLASSES, SR_CLASSES)
            refused = [u for u, cls in refused_by_study.get(study, []) if cls in mine]
            hit = next((i for i, (txt, _) in enumerate(dl_text) if i not in used and any(u in txt for u in refused)),
                       None)
            if hit is None:
                hit = next((i for i, (txt, _) in enumerate(dl_text) if i not in used and (sop in txt or study in txt)
                            and not any(c in txt for c in other)), None)
            if hit is not None:
                used.add(hit)
                if dl_text[hit][1]:
                    acct[f"{k} dead-lettered with a reason"] += 1
                else:
                    acct[f"{k} dead-lettered WITHOUT a reason"] += 1
                    missing.append(k)
            elif refused and refused_ok:
                acct[f"{k} refused by the PACS, dead-lettered (in aggregate: no route)"] += 1
            else:
                missing.append(k)
                acct[f"{k} neither filed nor dead-lettered" + (" (refused by the PACS)" if refused else "")] += 1
        if missing:
            lost.append((sop, study, missing, decisions.get(sop)))
            if restart_t is not None and t < restart_t:
                lost_before.append(sop)
    n_before = sum(1 for t, _, _ in sources.values() if restart_t is not None and t < restart_t)
    return acct, lost, lost_before, n_before, gate_refused


def main():
    global DEFAULT_MODEL
    if not os.path.exists(A.bin):
        sys.exit(f"no binary at {A.bin} (cargo build --release --bin cxr-serve, or --bin)")
    DEFAULT_MODEL = A.model or "weighted"
    log(f"work dir {WORK}; ports http {P_HTTP} grpc {P_GRPC} dicom {P_DICOM} gate {GATE} orthanc {O_DICOM}/{O_HTTP}")
    start_orthanc()
    gate = start_gate()
    cmd = server_cmd(make_keys())
    run = start_server(cmd)
    # warm: one of each door before the clock starts
    legit_http(0), legit_grpc(0), legit_dicom(0)
    for d in LEGIT:
        LEGIT[d].clear()
    ACKED.clear()
    duration = A.minutes * 60
    t_start = time.time()
    threads = paced("http", A.http_rate, legit_http) + paced("grpc", A.grpc_rate, legit_grpc) + \
        paced("dicom", A.dicom_rate, legit_dicom)
    if not A.no_hostile:
        threads += [threading.Thread(target=hostile_launcher, args=(d, e, f, h, i * 0.37), daemon=True)
                    for i, (d, e, f, h) in enumerate(HOSTILE_KINDS)]
    for t in threads:
        t.start()
    died = []
    restarted = False
    while time.time() - t_start < duration:
        time.sleep(1)
        if RUNS[-1]["proc"].poll() is not None and RUNS[-1]["sigterm"] is None:
            died.append((now(), RUNS[-1]["proc"].returncode))
            log(f"cxr-serve died (rc {RUNS[-1]['proc'].returncode}): starting it again")
            RUNS[-1]["exited"], RUNS[-1]["rc"] = now(), RUNS[-1]["proc"].returncode
            run = start_server(cmd)
        if A.restart_at and not restarted and time.time() - t_start >= duration * A.restart_at:
            restarted = True
            log("restart: SIGTERM")
            stop_server(RUNS[-1])
            run = start_server(cmd)
    log("load phase over: waiting for the clients")
    STOP.set()
    end = time.time() + A.request_deadline + 30
    for t in threads:
        t.join(timeout=max(1, end - time.time()))
    for t in list(HOSTILE_THREADS):
        t.join(timeout=max(1, min(end, time.time() + A.hostile_cap + 30) - time.time()))
    t_load_end = now()

    # drain
    log("waiting for the outbox to drain")
    deadline = time.time() + A.drain_timeout
    depth = None
    while time.time() < deadline:
        ms = metrics()
        if ms is not None:
            depth = sum(by_label(ms, DEPTH_METRIC, "destination").values())
            if depth == 0:
                break
        time.sleep(2)
    time.sleep(2)
    ms = metrics() or {}
    if not any(n == DEPTH_METRIC for n, _ in ms):
        depth = None
    dl_route, dls = dead_letters()
    index = orthanc_index()
    sources = {sop: (t, n, study) for t, n, sop, study in ACKED}
    decisions = audit_decisions(set(sources))
    last = RUNS[-1]
    stop_server(last)
    gate.shutdown()
    results = over_runs(RESULTS_METRIC, "outcome")
    stores = over_runs(STORES_METRIC, "outcome")
    assocs = over_runs(ASSOC_METRIC, "outcome")
    dead_metric = sum(v for k, v in results.items() if k in DEAD_OUTCOMES)
    # Without the dead-letter route, an object the PACS refused counts as dead-lettered
    # only in aggregate: the outbox drained and /metrics counts as many dead letters.
    refused_ok = dls is None and depth == 0 and dead_metric >= len({g[1] for g in GATE_LOG if g[4]})

    # per-source accounting
    restart_t = next((r["sigterm"] for r in RUNS if r["sigterm"] is not None and r is not last), None)
    acct, lost, lost_before, n_before, gate_refused = account(sources, decisions, index, GATE_LOG, dls,
                                                              refused_ok, restart_t)
    n_refused_objects = len(gate_refused)

    # checks
    checks = []

    def check(name, ok, detail=""):
        checks.append((name, bool(ok), detail))

    for d in ("http", "grpc"):
        c = LEGIT[d]
        bad = c["unanswered"] + c["dropped"] + c["client_error"] + sum(v for k, v in c.items() if k.startswith("status_"))
        check(f"every legitimate {d} request answered", bad == 0 and c["sent"] > 0,
              f"{c['sent']} sent, {bad} unanswered/dropped/other status")
    c = LEGIT["dicom"]
    acked = sum(v for k, v in c.items() if k.startswith("acknowledged") and k != "acknowledged_after_retry")
    check("every legitimate DICOM instance acknowledged", acked == c["sent"] and c["sent"] > 0 and not c["dropped"],
          f"{c['sent']} sent, {acked} acknowledged, {c['dropped']} C-STOREs left unanswered")
    check("every acknowledged instance's results filed or dead-lettered with a reason",
          not lost and sources,
          f"{len(sources)} instances, {len(lost)} with results missing" +
          ("" if dls is not None else f"; no dead-letter route: {dead_metric:.0f} dead letters in /metrics "
                                      f"for {n_refused_objects} objects the PACS refused"))
    if restart_t is not None:
        check("nothing lost across the restart", not lost_before and n_before > 0,
              f"{n_before} acknowledged before the SIGTERM, {len(lost_before)} with results missing")
        r0 = next(r for r in RUNS if r["sigterm"] is not None and r is not last)
        check("SIGTERM: the server exits by itself", isinstance(r0["rc"], int),
              f"rc {r0['rc']} in {r0['exited'] - r0['sigterm']:.1f} s")
    check("the server never died on its own", not died, f"{died}" if died else "")
    peak = max(r["rss_peak"] for r in RUNS)
    check(f"RSS bounded (peak under {A.rss_limit_mb:g} MB)", peak < A.rss_limit_mb, f"peak {peak:.0f} MB")
    check("the outbox drained", depth == 0, f"depth {depth}" if depth is not None else f"no {DEPTH_METRIC}")

    # ---- the report ----
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    P = print
    P()
    P(f"### Soak: {A.minutes:g} min, HTTP + gRPC + DICOM" + ("" if A.no_hostile else " beside a hostile mix")
      + (f", restart at {A.restart_at * 100:.0f} %" if A.restart_at else "")
      + f" ({time.strftime('%Y-%m-%d', time.gmtime())})")
    P()
    P(f"`bench/soak.py --minutes {A.minutes:g}` ({git}), `{os.path.relpath(A.bin, ROOT) if A.bin.startswith(ROOT) else A.bin}`, "
      f"model `{DEFAULT_MODEL}`; {cpu_line()}. Legit load: /predict {A.http_rate:g}/s, gRPC {A.grpc_rate:g}/s, "
      f"C-STORE {A.dicom_rate:g}/s ({A.clients} clients per door); hostile: at most {A.hostile_per_door} held "
      f"sockets per door, each at most {A.hostile_cap:g} s, and {QUICK_PER_DOOR} quick ones. PACS: Orthanc behind a gate refusing "
      f"{A.reject_share * 100:.0f} % of the result objects with status {A.reject_status:04X}.")
    P()
    P("| door | sent | answered | after retries | retries | not answered "
      "| p50 / p99 / max s, retries included | p50 / p99 s away from the restart |")
    P("|---|---|---|---|---|---|---|---|")
    for d in ("http", "grpc", "dicom"):
        c = LEGIT[d]
        ans = {k: v for k, v in c.items() if (k.startswith("answered") or k.startswith("acknowledged"))
               and not k.endswith("after_retry")}
        ret = {k[8:]: v for k, v in c.items() if k.startswith("retried_")}
        bad = {k: v for k, v in c.items() if k in ("unanswered", "dropped", "client_error") or k.startswith("status_")}
        lat = [x for _, x in LATENCY[d]]
        calm = [x for t, x in LATENCY[d] if not restart_window(t - 5, t + x + 5)]
        P(f"| {d} | {c['sent']} | {sum(ans.values())} {dict(ans) if len(ans) > 1 else ''} | "
          f"{c['answered_after_retry'] + c['acknowledged_after_retry']} | {dict(ret) or 0} | {dict(bad) or 0} | "
          f"{pct(lat, .5):.2f} / {pct(lat, .99):.2f} / {pct(lat, 1):.1f} | {pct(calm, .5):.2f} / {pct(calm, .99):.2f} |")
    P()
    P(f"DICOM results: {len(sources)} instances acknowledged ({n_before} before the restart); audit decisions "
      f"{dict(collections.Counter(decisions.values()))}; per expected object: {dict(acct)}.")
    P(f"PACS gate: {sum(1 for g in GATE_LOG if not g[4])} objects forwarded to Orthanc "
      f"(statuses {dict(collections.Counter(f'{g[5]:04X}' for g in GATE_LOG if not g[4]))}), "
      f"{n_refused_objects} objects refused in {sum(k for _, _, k in gate_refused.values())} attempts.")
    P(f"/metrics summed over the runs: `{RESULTS_METRIC}` by outcome {results}; `{STORES_METRIC}` {stores}; "
      f"`{ASSOC_METRIC}` {assocs}; outbox depth {depth}.")
    dl_text = [(json.dumps(e), entry_reason(e)) for e in (dls or [])]
    P(f"Dead letters: " + (f"`GET {dl_route}` lists {len(dls)}, {sum(1 for _, w in dl_text if w)} with a reason"
                           + (f" (e.g. {dl_text[0][1][:100]!r})" if dl_text and dl_text[0][1] else "")
                           if dls is not None else f"no route answered ({', '.join(DEAD_LETTER_ROUTES)})") + ".")
    P()
    P("| server run | ready after | RSS peak (VmRSS, sampled 1/s) | VmHWM | end |")
    P("|---|---|---|---|---|")
    for r in RUNS:
        endw = (f"SIGTERM → exit {r['rc']} in {r['exited'] - r['sigterm']:.1f} s" if r["sigterm"] is not None
                else f"died rc {r['rc']}")
        P(f"| {r['n']} | {(r['ready'] or 0) - r['started']:.1f} s | {r['rss_peak']:.0f} MB | {r['hwm']:.0f} MB | {endw} |")
    P()
    if HOSTILE:
        P("| hostile kind | sent | how it ended (count) |")
        P("|---|---|---|")
        for kind in sorted(HOSTILE):
            oc = HOSTILE[kind]
            P(f"| {kind} | {sum(oc.values())} | " + "; ".join(f"{k}: {v}" for k, v in oc.most_common()) + " |")
        P()
    for d in FAILS:
        for f in FAILS[d][:5]:
            P(f"- {d} failure: {f}")
    for sop, study, missing, dec in lost[:5]:
        P(f"- results missing: source {sop} (study {study}, audit {dec}): {missing}")
    P()
    P("| check | result | |")
    P("|---|---|---|")
    for name, ok, detail in checks:
        P(f"| {name} | {'PASS' if ok else '**FAIL**'} | {detail} |")
    P()
    held = {k: v["held to cap"] for k, v in HOSTILE.items() if v["held to cap"]}
    P(f"| INFO: hostile clients not refused within {A.hostile_cap:g} s | {sum(held.values())} | {held or ''} |")
    P()
    ok = all(c[1] for c in checks)
    P("PASS" if ok else "FAIL")
    return 0 if ok else 1


def cleanup():
    STOP.set()
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    if A.keep:
        print(f"(kept {WORK})", file=sys.stderr)
    else:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    rc = 1
    try:
        rc = main()
    finally:
        cleanup()
    os._exit(rc)
