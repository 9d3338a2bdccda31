"""The CPU backends on the shipped models, one run: raw ONNX Runtime and raw
OpenVINO from Python (batch 1 latency; throughput: ORT at batch 4, OpenVINO with its
own async queue and the THROUGHPUT hint), and cxr-serve with --backend ort,
openvino and auto (p50 at concurrency 1; images/s at saturation, 8 clients), for
an FP32 and an INT8 file. Starts its own servers (release build).

    cargo build --release --bin cxr-serve
    .venv/bin/python bench/backends.py [--models weighted,weighted-int8]
"""
import os, statistics, subprocess, sys, time

import numpy as np
import openvino as ov

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def raw_ov(path, threads, n1, nsat):
    core = ov.Core()
    model = core.read_model(path)
    lat = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                            "INFERENCE_PRECISION_HINT": "f32"})
    x = serving.noise(1)
    req = lat.create_infer_request()
    for _ in range(3):
        req.infer({0: x})
    ts = []
    for _ in range(n1):
        t = time.time()
        req.infer({0: x})
        ts.append(time.time() - t)
    thr = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": threads,
                                            "INFERENCE_PRECISION_HINT": "f32"})
    q = ov.AsyncInferQueue(thr)
    for _ in range(4):
        q.start_async({0: x})
    q.wait_all()
    t = time.time()
    for _ in range(nsat):
        q.start_async({0: x})
    q.wait_all()
    return statistics.median(ts) * 1e3, nsat / (time.time() - t)


def raw_ort(models_dir, name, threads, n1, nsat):
    s = serving.raw_session(models_dir, name, threads)
    x1, x4 = serving.noise(1), serving.noise(4)
    for x in (x1, x4, x1):
        s.run(["probabilities"], {"image": x})
    ts = []
    for _ in range(n1):
        t = time.time()
        s.run(["probabilities"], {"image": x1})
        ts.append(time.time() - t)
    return statistics.median(ts) * 1e3, serving.raw_rate(s, x4, nsat)


def served(a, name, backend, body, n1, nsat):
    port = serving.free_port()
    srv = subprocess.Popen(
        [os.path.join(HERE, "..", "target", "release", "cxr-serve"), "--models-dir", a.models_dir,
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--intra-threads", str(a.threads),
         "--backend", backend], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        deadline = time.time() + 600
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200:
                    break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        serving._local.__dict__.pop("conns", None)
        for _ in range(3):
            serving.predict(port, name, body)
        serving.saturate(port, name, body, a.concurrency * 2, a.concurrency)
        ts = [serving.predict(port, name, body) for _ in range(n1)]
        rate = serving.saturate(port, name, body, nsat, a.concurrency)
        import json, urllib.request
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/models/{name}"))
        return statistics.median(ts) * 1e3, rate, info["live"]["execution_provider"]
    finally:
        srv.terminate()
        srv.wait(timeout=120)


def main():
    ap = serving.parser(__doc__)
    ap.add_argument("--models", default="weighted,weighted-int8")
    ap.add_argument("--n1", type=int, default=20)
    ap.add_argument("--nsat", type=int, default=48)
    a = ap.parse_args()
    body = serving.test_jpeg(a.data)
    flags = open("/proc/cpuinfo").read()
    kept = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    print(f"{a.threads} threads, saturation with {a.concurrency} clients, CPU flags: {' '.join(kept)}")
    print("| file | way | p50 batch-1 latency | images/s at saturation | note |")
    print("|---|---|---|---|---|")
    for name in a.models.split(","):
        path = os.path.join(a.models_dir, name + ".onnx")
        ol, orate = raw_ort(a.models_dir, name, a.threads, a.n1, a.nsat)
        print(f"| {name} | raw ONNX Runtime (batch 4) | {ol:.1f} ms | {orate:.1f} | |", flush=True)
        vl, vrate = raw_ov(path, a.threads, a.n1, a.nsat)
        print(f"| {name} | raw OpenVINO (async, THROUGHPUT) | {vl:.1f} ms | {vrate:.1f} | {vl / ol:.2f}× / {vrate / orate:.2f}× of raw ORT |", flush=True)
        base = None
        for backend in ("ort", "openvino", "auto"):
            l, r, used = served(a, name, backend, body, a.n1, a.nsat)
            base = base or r
            print(f"| {name} | cxr-serve --backend {backend} | {l:.1f} ms | {r:.1f} | {used}; {r / base:.2f}× of --backend ort, {r / vrate:.2f}× of raw OpenVINO |", flush=True)


if __name__ == "__main__":
    main()
