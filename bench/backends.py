"""The CPU backends on the shipped models, interleaved in one run: raw ONNX Runtime
and raw OpenVINO from Python, and cxr-serve with --backend ort, openvino and auto,
for each file named (an FP32 and an INT8 one by default).

Batch-1 latency: the p50 of single requests (raw: one image through the runtime;
served: one POST /predict at concurrency 1). Throughput at saturation: images/s of
`--nsat` images (raw ONNX Runtime: batch 4 back to back; raw OpenVINO: its own async
queue with the THROUGHPUT hint, the issue's reference; served: 8 clients in a closed
loop). The three servers of a file are started one after another (so that `auto`
measures at load with nothing else running) and kept up; then every round measures
every way once, in a rotated order, with a pause between ways. Latencies are the
median over all rounds' samples, throughputs the median over rounds, and every ratio
is the median of the per-round ratios (each taken between ways measured seconds
apart). Then each goal ratio (auto over raw OpenVINO, auto over ONNX Runtime) is
measured again between its two ways alone, alternating, with no third way in between.

The physical limit: DenseNet-161's multiply-accumulates per 224-px image (counted
from the architecture, as torchvision's 7.73 G) over the machine's MAC rate. The FP32
rate is measured in the same run (a 2048x2048 FP32 GEMM through numpy's OpenBLAS on
the same threads: what these cores reach on the densest kernel there is); the INT8
rate is 4x it on a CPU with AVX-512 VNNI or AVX-VNNI (vpdpbusd does 4 INT8 MACs per
32-bit lane where an FMA does 1) and 2x without (vpmaddubsw). The column says what
share of that bound each way reaches.

    cargo build --release --bin cxr-serve
    .venv/bin/python bench/backends.py [--models weighted,weighted-int8] [--rounds 6]
"""
import json, os, statistics, subprocess, sys, tempfile, time, urllib.request

import numpy as np
import openvino as ov

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def densenet161_macs(size=224, growth=48, blocks=(6, 12, 36, 24), init=96, bn=4):
    """Convolution and linear MACs of one image (torchvision's DenseNet-161)."""
    r = size // 2
    m = init * 3 * 49 * r * r
    r //= 2
    c = init
    for i, n in enumerate(blocks):
        for _ in range(n):
            m += c * bn * growth * r * r + bn * growth * growth * 9 * r * r
            c += growth
        if i < len(blocks) - 1:
            m += c * (c // 2) * r * r
            c //= 2
            r //= 2
    return m + c * 2


def gemm_rate(threads):
    """FP32 MACs per second of a 2048x2048 GEMM on `threads` threads."""
    try:
        from threadpoolctl import threadpool_limits
        ctx = threadpool_limits(threads)
    except ImportError:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        a = np.random.default_rng(1).random((2048, 2048), dtype=np.float32)
        for _ in range(2):
            a @ a
        best = 0.0
        for _ in range(3):
            t = time.time()
            for _ in range(4):
                a @ a
            best = max(best, 4 * 2048 ** 3 / (time.time() - t))
    return best


class RawOrt:
    def __init__(self, a, name):
        self.s = serving.raw_session(a.models_dir, name, a.threads)
        self.x1, self.x4 = serving.noise(1), serving.noise(4)
        for x in (self.x1, self.x4, self.x1, self.x4):
            self.s.run(["probabilities"], {"image": x})

    def latency(self):
        t = time.time()
        self.s.run(["probabilities"], {"image": self.x1})
        return time.time() - t

    def rate(self, n):
        return serving.raw_rate(self.s, self.x4, n)


class RawOv:
    def __init__(self, a, path):
        core = ov.Core()
        model = core.read_model(path)
        cfg = dict(OV_CONFIG, INFERENCE_NUM_THREADS=a.threads)
        self.lat = core.compile_model(model, "CPU", dict(cfg, PERFORMANCE_HINT="LATENCY"))
        self.thr = core.compile_model(model, "CPU", dict(cfg, PERFORMANCE_HINT="THROUGHPUT"))
        self.req = self.lat.create_infer_request()
        self.q = ov.AsyncInferQueue(self.thr)
        self.x = serving.noise(1)
        for _ in range(3):
            self.req.infer({0: self.x})
        self.rate(4)

    def latency(self):
        t = time.time()
        self.req.infer({0: self.x})
        return time.time() - t

    def rate(self, n):
        t = time.time()
        for _ in range(n):
            self.q.start_async({0: self.x})
        self.q.wait_all()
        return n / (time.time() - t)


class Served:
    def __init__(self, a, name, backend, body):
        self.name, self.body, self.conc = name, body, a.concurrency
        self.dir = tempfile.TemporaryDirectory(prefix=f"cxr-bench-{backend}-")
        card = json.load(open(os.path.join(a.models_dir, name + ".json")))
        files = [name + ".json", name + ".onnx", (card.get("ood") or {}).get("file")]
        for f in filter(None, files):
            os.symlink(os.path.abspath(os.path.join(a.models_dir, f)), os.path.join(self.dir.name, f))
        self.port = serving.free_port()
        self.srv = subprocess.Popen(
            [os.path.join(HERE, "..", "target", "release", "cxr-serve"), "--models-dir", self.dir.name,
             "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--intra-threads", str(a.threads), "--backend", backend],
            stdout=subprocess.DEVNULL, stderr=open(os.environ.get("CXR_BENCH_LOG", os.devnull), "w"))
        deadline = time.time() + 600
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5).status == 200:
                    break
            except Exception:
                if time.time() > deadline or self.srv.poll() is not None:
                    raise
                time.sleep(0.5)
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/models/{name}"))
        self.provider = info["live"]["execution_provider"]
        self.choice = info["live"].get("backend_choice")
        for _ in range(3):
            serving.predict(self.port, name, body)
        serving.saturate(self.port, name, body, self.conc * 2, self.conc)

    def latency(self):
        return serving.predict(self.port, self.name, self.body)

    def rate(self, n):
        return serving.saturate(self.port, self.name, self.body, n, self.conc)

    def close(self):
        self.srv.terminate()
        self.srv.wait(timeout=120)
        self.dir.cleanup()


def main():
    ap = serving.parser(__doc__)
    ap.add_argument("--models", default="weighted,weighted-int8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n1", type=int, default=6, help="batch-1 samples per way and round")
    ap.add_argument("--nsat", type=int, default=24, help="images per way and round at saturation")
    ap.add_argument("--pair-rounds", type=int, default=10, help="alternating rounds of each goal pair")
    a = ap.parse_args()
    body = serving.test_jpeg(a.data)
    flags = open("/proc/cpuinfo").read()
    kept = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    vnni = "avx512_vnni" in kept or "avx_vnni" in kept
    macs = densenet161_macs()
    fp32 = gemm_rate(a.threads)
    peak = {"fp32": fp32, "int8": fp32 * (4 if vnni else 2)}
    print(f"{a.threads} threads, saturation with {a.concurrency} clients, {a.rounds} interleaved rounds, "
          f"CPU flags: {' '.join(kept)}")
    print(f"DenseNet-161: {macs / 1e9:.2f} GMAC per image; FP32 GEMM measured {fp32 / 1e9:.1f} GMAC/s "
          f"(bound {fp32 / macs:.1f} img/s); INT8 bound {peak['int8'] / 1e9:.0f} GMAC/s "
          f"({peak['int8'] / macs:.1f} img/s, {'VNNI' if vnni else 'no VNNI'})")
    print()
    print("| file | way | p50 batch-1 latency | images/s at saturation | share of the physical limit | note |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        card = json.load(open(os.path.join(a.models_dir, name + ".json")))
        precision = card.get("precision", "fp32").lower()
        bound = peak.get(precision, fp32) / macs
        ways = {}
        try:
            for backend in ("ort", "openvino", "auto"):
                ways[f"cxr-serve --backend {backend}"] = Served(a, name, backend, body)
            ways["raw ONNX Runtime (batch 4)"] = RawOrt(a, name)
            ways["raw OpenVINO (async, THROUGHPUT)"] = RawOv(a, os.path.join(a.models_dir, name + ".onnx"))
            keys = list(ways)
            lat = {k: [] for k in keys}
            rate = {k: [] for k in keys}
            for r in range(a.rounds):
                order = keys[r % len(keys):] + keys[:r % len(keys)]
                for k in order:
                    time.sleep(0.3)
                    lat[k] += [ways[k].latency() for _ in range(a.n1)]
                    time.sleep(0.3)
                    rate[k].append(ways[k].rate(a.nsat))
                print(f"  {name}: round {r + 1}/{a.rounds}: " + ", ".join(f"{k.split()[-1]} {rate[k][-1]:.1f}" for k in order), file=sys.stderr, flush=True)

            def ratio(x, y):
                return statistics.median(p / q for p, q in zip(rate[x], rate[y]))

            ort_s, auto_s, ov_s = "cxr-serve --backend ort", "cxr-serve --backend auto", "cxr-serve --backend openvino"
            raw_ov, raw_ort = "raw OpenVINO (async, THROUGHPUT)", "raw ONNX Runtime (batch 4)"
            for k in keys:
                rt = statistics.median(rate[k])
                note = []
                if isinstance(ways[k], Served):
                    note.append(ways[k].provider)
                    if k != ort_s:
                        note.append(f"{ratio(k, ort_s):.2f}× of --backend ort")
                    note.append(f"{ratio(k, raw_ov):.2f}× of raw OpenVINO")
                elif k == raw_ov:
                    note.append(f"{ratio(k, raw_ort):.2f}× of raw ONNX Runtime")
                print(f"| {name} | {k} | {statistics.median(lat[k]) * 1e3:.1f} ms | {rt:.1f} | "
                      f"{rt / bound:.0%} | {'; '.join(note)} |", flush=True)
            print(f"  {name} ({precision}): auto chose {ways[auto_s].provider}: {ways[auto_s].choice}", flush=True)
            # The goal ratios again, each measured between its two ways alone,
            # alternating (A B B A …), so that no third way runs in between.
            for x, y in ((auto_s, raw_ov), (auto_s, ort_s)):
                rx, ry = [], []
                for r in range(a.pair_rounds):
                    for k in ((x, y) if r % 2 == 0 else (y, x)):
                        time.sleep(0.3)
                        (rx if k == x else ry).append(ways[k].rate(a.nsat))
                ratio_pair = statistics.median(p / q for p, q in zip(rx, ry))
                print(f"  {name} pair: {x} / {y} at saturation {ratio_pair:.2f}× "
                      f"({statistics.median(rx):.1f} / {statistics.median(ry):.1f} img/s, {a.pair_rounds} alternating rounds)", flush=True)
            print(f"  {name} goals: auto/ort at saturation {ratio(auto_s, ort_s):.2f}×, "
                  f"auto/raw OpenVINO {ratio(auto_s, raw_ov):.2f}×, openvino/ort {ratio(ov_s, ort_s):.2f}×", flush=True)
        finally:
            for w in ways.values():
                if isinstance(w, Served):
                    w.close()


if __name__ == "__main__":
    main()
