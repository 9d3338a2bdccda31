#!/usr/bin/env python3
"""INT8 against FP32, served, in one run on one server (which loads `models/`, so both
`<name>` and `<name>-int8`): p50 of sequential POST /predict at concurrency 1
(interleaved A/B/A/B, after warm-ups), and images per second at saturation
(`--concurrency` clients, alternating blocks of `--n-sat` requests per model, best of
`--rounds`). Also raw ONNX Runtime b1 (Python, same files, 2 intra-op threads) for
reference. Prints the ratios INT8 / FP32.

    python3 bench/int8.py --port 8090 [--model weighted] [--n 40] [--concurrency 4]
"""
import argparse, concurrent.futures as cf, glob, os, statistics, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--model", default="weighted")
ap.add_argument("--n", type=int, default=40)
ap.add_argument("--n-sat", type=int, default=48)
ap.add_argument("--concurrency", type=int, default=4)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--models-dir", default=os.path.join(os.path.dirname(__file__), "..", "models"))
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
a = ap.parse_args()
body = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()
fp32, int8 = a.model, a.model + "-int8"


def one(model):
    r = urllib.request.Request(f"http://127.0.0.1:{a.port}/predict?model={model}", data=body, headers={"Content-Type": "image/jpeg"})
    t = time.time()
    urllib.request.urlopen(r).read()
    return time.time() - t


for m in (fp32, int8):
    for _ in range(5):
        one(m)
seq = {fp32: [], int8: []}
for _ in range(a.n):
    for m in (fp32, int8):
        seq[m].append(one(m))


def saturate(model):
    t = time.time()
    with cf.ThreadPoolExecutor(a.concurrency) as ex:
        list(ex.map(lambda _: one(model), range(a.n_sat)))
    return a.n_sat / (time.time() - t)


sat = {fp32: [], int8: []}
for _ in range(a.rounds):
    for m in (fp32, int8):
        sat[m].append(saturate(m))
p50 = {m: statistics.median(v) * 1e3 for m, v in seq.items()}
ips = {m: max(v) for m, v in sat.items()}
print(f"served p50 at concurrency 1: {fp32} {p50[fp32]:.1f} ms, {int8} {p50[int8]:.1f} ms -> speed-up {p50[fp32] / p50[int8]:.3f}x")
print(f"served at saturation ({a.concurrency} clients): {fp32} {ips[fp32]:.2f} img/s, {int8} {ips[int8]:.2f} img/s -> {ips[int8] / ips[fp32]:.3f}x")

try:
    import numpy as np, onnxruntime as ort

    def session(m):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        return ort.InferenceSession(os.path.join(a.models_dir, m + ".onnx"), so, providers=["CPUExecutionProvider"])

    def median_run(s, batch, warm, runs):
        """Median seconds of one run on a seeded random batch, after `warm` runs."""
        x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
        for _ in range(warm):
            s.run(["probabilities"], {"image": x})
        ts = []
        for _ in range(runs):
            t = time.time()
            s.run(["probabilities"], {"image": x})
            ts.append(time.time() - t)
        return statistics.median(ts)

    sessions = {m: session(m) for m in (fp32, int8)}
    raw = {m: median_run(sessions[m], 1, 3, a.n) * 1e3 for m in (fp32, int8)}
    print(f"raw ONNX Runtime b1 median: {fp32} {raw[fp32]:.1f} ms, {int8} {raw[int8]:.1f} ms -> {raw[fp32] / raw[int8]:.3f}x")
    # Raw throughput at batch 4 (what the server's batcher forms under load), and the
    # served figures against raw on the same file and threads.
    raw4 = {m: 4 / median_run(sessions[m], 4, 1, max(4, a.n // 4)) for m in (fp32, int8)}
    print(f"raw ONNX Runtime b4: {fp32} {raw4[fp32]:.2f} img/s, {int8} {raw4[int8]:.2f} img/s -> {raw4[int8] / raw4[fp32]:.3f}x")
    for m in (fp32, int8):
        print(f"served / raw, {m}: saturation {ips[m] / raw4[m]:.3f}, p50 c=1 {p50[m] / raw[m]:.3f} (served time / raw time)")
except ImportError:
    print("raw ONNX Runtime: onnxruntime not importable here (run with .venv/bin/python)")
