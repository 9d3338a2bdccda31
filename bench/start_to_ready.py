"""Start to ready (issue 45): seconds from starting cxr-serve to its first `/ready`
200, for the binary and for the CPU image, three ways:

- `ort`: `--backend ort` (no OpenVINO at all);
- `auto-cold`: `--backend auto` with no decision file and no OpenVINO compiled-model
  cache (both backends compiled and measured per model, the decision written);
- `auto-warm`: `--backend auto` with the decision and the cache the cold start left
  (the decision read, OpenVINO's models loaded from its cache).

Each start also prints the CPU seconds cxr-serve spent until ready (user + system,
every thread), which a shared machine's load hardly moves. Each round runs the three in that order on a fresh state folder (the warm start uses
the cold start's state), `--runs` rounds; the table gives each run and the median.
`throughput` then compares the served rate of one model with the decision measured at
this start against the same decision read from the file (closed loop, 8 clients,
alternating, `--runs` rounds each).

    cargo build --release --bin cxr-serve
    .venv/bin/python bench/start_to_ready.py binary              # the binary
    bash scripts/container-smoke.sh                               # builds localhost/cxr:smoke
    .venv/bin/python bench/start_to_ready.py image                # the CPU image (podman)
    .venv/bin/python bench/start_to_ready.py throughput [--model weighted-int8]

The image runs as deploy/ runs it: non-root, read-only root, `/tmp` on tmpfs, the
decision and cache on a volume at /var/lib/cxr/backend (a host folder here), with
deploy/deployment.yaml's threads and backend settings (`CXR_INTRA_THREADS`,
`CXR_DECODE_THREADS`, `CXR_DEVICE`, `CXR_BACKEND_DECISION`, `CXR_OPENVINO_CACHE_DIR`):
the warm start is a replica starting on the volume another replica (another
container, another host name) filled. Every warm start must have loaded each
OpenVINO model's compiled models from the cache (`live.openvino_from_cache`).
"""
import argparse, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time
import urllib.error, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
WAYS = ["ort", "auto-cold", "auto-warm"]
VOLUME = "/var/lib/cxr/backend"
DEPLOY_ENV = ["CXR_DEVICE", "CXR_INTRA_THREADS", "CXR_DECODE_THREADS", "CXR_BACKEND_DECISION",
              "CXR_OPENVINO_CACHE_DIR"]


def deploy_env():
    """DEPLOY_ENV's values in deploy/deployment.yaml (`- {name: X, value: Y}`)."""
    text = open(os.path.join(ROOT, "deploy", "deployment.yaml")).read()
    found = dict(re.findall(r'-\s*\{name:\s*(CXR_[A-Z_]+),\s*value:\s*"?([^"}]*?)"?\s*\}', text))
    env = {k: found[k] for k in DEPLOY_ENV if k in found}
    missing = set(DEPLOY_ENV) - set(env)
    if missing:
        raise RuntimeError(f"deploy/deployment.yaml sets no {sorted(missing)}")
    for k in ["CXR_BACKEND_DECISION", "CXR_OPENVINO_CACHE_DIR"]:
        if not env[k].startswith(VOLUME + "/"):
            raise RuntimeError(f"{k}={env[k]} is not on the backend volume {VOLUME}")
    return env


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def models(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=10) as r:
        return json.load(r)["models"]


def wait_ready(port, alive, t0, limit=600):
    while not ready(port):
        if not alive():
            raise RuntimeError("cxr-serve exited before it was ready")
        if time.time() - t0 > limit:
            raise RuntimeError(f"not ready in {limit} s")
        time.sleep(0.05)
    return time.time() - t0


class Binary:
    """cxr-serve run from a file, its decision and cache in `state`."""

    def __init__(self, a, way, state):
        self.port = serving.free_port()
        backend = "ort" if way == "ort" else "auto"
        cmd = [a.binary, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
               "--log-format", "json", "--backend", backend, "--models-dir", a.models_dir,
               "--backend-decision", os.path.join(state, "backend.decision.json"),
               "--openvino-cache-dir", os.path.join(state, "openvino-cache")]
        env = dict(os.environ, OPENVINO_LIB=a.openvino_lib, ORT_DYLIB_PATH=a.ort_lib)
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.seconds = wait_ready(self.port, lambda: self.p.poll() is None, self.t0)
        self.cpu = cpu_seconds(open(f"/proc/{self.p.pid}/stat").read())

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(60)


class Image:
    """The CPU image under podman, the state folder mounted at /var/lib/cxr/backend."""

    def __init__(self, a, way, state):
        self.port = serving.free_port()
        self.name = f"cxr-ready-{os.getpid()}-{time.time_ns()}"
        backend = "ort" if way == "ort" else "auto"
        env = [x for k, v in deploy_env().items() for x in ("-e", f"{k}={v}")]
        cmd = ["podman", "run", "-d", "--name", self.name, "--read-only", "--tmpfs", "/tmp",
               "-v", f"{state}:{VOLUME}", "-e", f"CXR_BACKEND={backend}", *env,
               "-p", f"127.0.0.1:{self.port}:8080", a.image]
        self.t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        def alive():
            out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", self.name],
                                 capture_output=True, text=True)
            return out.stdout.strip() == "true"

        self.seconds = wait_ready(self.port, alive, self.t0)
        stat = subprocess.run(["podman", "exec", self.name, "cat", "/proc/1/stat"],
                              capture_output=True, text=True, check=True).stdout
        self.cpu = cpu_seconds(stat)

    def stop(self):
        subprocess.run(["podman", "rm", "-f", "-t", "20", self.name], stdout=subprocess.DEVNULL)


def cpu_seconds(stat):
    """CPU seconds (user + system, every thread) of a process, from its /proc stat
    line: what the start cost, whatever else the machine ran meanwhile."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sources(port):
    """Each model's decision source (`measured`, `read`, or `-` without one) and the
    backend serving it (`ov+cache`: OpenVINO, its compiled models loaded from the
    cache)."""
    def backend(live):
        if live["execution_provider"] != "OpenVINO:CPU":
            return "ort"
        return "ov+cache" if live.get("openvino_from_cache") else "ov"
    return {m["card"]["name"]: ((m["live"].get("backend_decision") or {}).get("source", "-"),
                                backend(m["live"]))
            for m in models(port)}


def fresh_state(parent):
    d = tempfile.mkdtemp(dir=parent)
    os.chmod(d, 0o777)  # the image's user (10001) writes there
    return d


def start_to_ready(a, kind):
    run = Binary if kind == "binary" else Image
    parent = tempfile.mkdtemp(prefix="cxr-ready-")
    times = {w: [] for w in WAYS}
    try:
        for r in range(a.runs):
            state = fresh_state(parent)
            for way in WAYS:
                if way == "ort":
                    s = run(a, way, fresh_state(parent))
                else:
                    s = run(a, way, state)
                src = sources(s.port)
                s.stop()
                want = {"ort": {"-"}, "auto-cold": {"measured"}, "auto-warm": {"read"}}[way]
                if {s for s, _ in src.values()} != want:
                    raise RuntimeError(f"{way}: decisions {src}, expected {want}")
                if way == "auto-warm" and not a.allow_compile and any(b == "ov" for _, b in src.values()):
                    raise RuntimeError(f"{way}: OpenVINO compiled again, its cache not used: {src}")
                times[way].append(s.seconds)
                print(f"round {r + 1}: {kind} {way}: {s.seconds:.2f} s (CPU {s.cpu:.2f} s)  {src}",
                      flush=True)
                time.sleep(a.pause)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    cols = " | ".join(f"run {i + 1}" for i in range(a.runs))
    print(f"\n| {kind} | {cols} | median |\n|---|{'---|' * (a.runs + 1)}")
    for w in WAYS:
        runs = " | ".join(f"{t:.2f}" for t in times[w])
        print(f"| `{w}` | {runs} | **{statistics.median(times[w]):.2f}** |")


def throughput(a):
    """Served images/s of `a.model`: decision measured at this start vs read."""
    body = serving.test_jpeg(a.data)
    parent = tempfile.mkdtemp(prefix="cxr-ready-")
    rates = {"measured": [], "read": []}
    try:
        for r in range(a.runs):
            state = fresh_state(parent)
            for way, want in [("auto-cold", "measured"), ("auto-warm", "read")]:
                s = Binary(a, way, state)
                try:
                    m = {m["card"]["name"]: m["live"] for m in models(s.port)}[a.model]
                    assert m["backend_decision"]["source"] == want, m
                    for _ in range(4):
                        serving.predict(s.port, a.model, body)
                    rate = serving.saturate(s.port, a.model, body, a.n, a.concurrency)
                finally:
                    s.stop()
                rates[want].append(rate)
                print(f"round {r + 1}: {want}: {rate:.2f} images/s on {m['execution_provider']}", flush=True)
                time.sleep(a.pause)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [b / c for b, c in zip(rates["read"], rates["measured"])]
    print(f"\n| {a.model}, {a.concurrency} clients | rounds (images/s) | median |\n|---|---|---|")
    for k in ["measured", "read"]:
        print(f"| decision {k} | {', '.join(f'{x:.2f}' for x in rates[k])} | **{med[k]:.2f}** |")
    print(f"| read / measured | {', '.join(f'{x:.3f}' for x in ratios)} | **{statistics.median(ratios):.3f}** |")


def main():
    ap = serving.parser(__doc__)
    ap.add_argument("what", choices=["binary", "image", "throughput"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between starts")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "cxr-serve"))
    ap.add_argument("--image", default=os.environ.get("IMAGE", "localhost/cxr:smoke"))
    ap.add_argument("--ort-lib", default=os.environ.get(
        "ORT_DYLIB_PATH", os.path.join(ROOT, ".ort", "lib", "libonnxruntime.so")))
    ap.add_argument("--openvino-lib", default=os.environ.get(
        "OPENVINO_LIB", os.path.join(ROOT, ".openvino", "lib", "libopenvino_c.so")))
    ap.add_argument("--allow-compile", action="store_true",
                    help="a warm start that compiles OpenVINO's models again is shown (`ov`), "
                         "not an error (to time an image from before the fix)")
    ap.add_argument("--model", default="weighted-int8")
    ap.add_argument("--n", type=int, default=120, help="requests per throughput measurement")
    a = ap.parse_args()
    a.models_dir = os.path.abspath(a.models_dir)
    if a.what == "image":
        # scripts/container-smoke.sh's podman configuration for this sandbox.
        conf = "/var/tmp/cxr-container/containers.conf"
        if os.path.exists(conf):
            os.environ.setdefault("CONTAINERS_CONF", conf)
    if a.what == "throughput":
        throughput(a)
    else:
        start_to_ready(a, a.what)


if __name__ == "__main__":
    main()
