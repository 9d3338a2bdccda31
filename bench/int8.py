#!/usr/bin/env python3
"""INT8 against FP32, served and raw, in one run on one server (which loads `models/`,
so both `<name>` and `<name>-int8`). Everything is interleaved in time, so the drift
of a shared machine (30 % between minutes here) hits all four columns alike:

- p50 at concurrency 1: each of `--n` rounds sends one POST /predict per model and
  runs raw ONNX Runtime b1 once per model (Python, same files, `--threads` intra-op
  threads, ONNX Runtime's defaults otherwise);
- saturation: each of `--rounds` rounds runs, per model, a block of `--n-sat`
  requests from `--concurrency` clients, then raw ONNX Runtime for as many images at
  the batch size the server formed in that block (mean of its `cxr_batch_size`,
  rounded); medians over rounds.

A pause of 50 ms separates served from raw runs: ONNX Runtime's intra-op threads spin
for a moment after each run (by default), and one side's spinning tail would slow the
other's next run. Prints INT8 / FP32 (served and raw) and served / raw per model.

    .venv/bin/python bench/int8.py --port 8090 [--model weighted] [--n 40] [--concurrency 8]
"""
import argparse, concurrent.futures as cf, glob, os, statistics, time, urllib.request

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--model", default="weighted")
ap.add_argument("--n", type=int, default=40)
ap.add_argument("--n-sat", type=int, default=48)
ap.add_argument("--concurrency", type=int, default=8)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--models-dir", default=os.path.join(os.path.dirname(__file__), "..", "models"))
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
a = ap.parse_args()
body = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()
fp32, int8 = a.model, a.model + "-int8"
models = (fp32, int8)


GAP = 0.05  # s between switching served <-> raw: ONNX Runtime's threads spin for a
# moment after each run (its default), and a spinning tail of one would slow the other


def served(model):
    r = urllib.request.Request(f"http://127.0.0.1:{a.port}/predict?model={model}", data=body, headers={"Content-Type": "image/jpeg"})
    t = time.time()
    urllib.request.urlopen(r).read()
    return time.time() - t


def session(m):
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    return ort.InferenceSession(os.path.join(a.models_dir, m + ".onnx"), so, providers=["CPUExecutionProvider"])


sessions = {m: session(m) for m in models}
batches = {b: np.random.default_rng(0).normal(size=(b, 3, 224, 224)).astype(np.float32) for b in (1, 4)}


def raw(m, b):
    t = time.time()
    sessions[m].run(["probabilities"], {"image": batches[b]})
    return time.time() - t


for m in models:
    for _ in range(5):
        served(m)
        raw(m, 1)
    raw(m, 4)

seq = {(k, m): [] for k in ("served", "raw") for m in models}
for _ in range(a.n):
    for m in models:
        seq[("served", m)].append(served(m))
        time.sleep(GAP)
        seq[("raw", m)].append(raw(m, 1))
        time.sleep(GAP)


def saturate(model):
    t = time.time()
    with cf.ThreadPoolExecutor(a.concurrency) as ex:
        list(ex.map(lambda _: served(model), range(a.n_sat)))
    return a.n_sat / (time.time() - t)


def batches_formed(model):
    """(sum, count) of the server's cxr_batch_size histogram for `model`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{a.port}/metrics").read().decode()
    get = lambda k: next((float(l.split()[-1]) for l in text.splitlines() if l.startswith(f'cxr_batch_size_{k}{{model="{model}"}}')), 0.0)
    return get("sum"), get("count")


def raw_at(model, b):
    runs = max(1, a.n_sat // b)
    return b * runs / sum(raw(model, b) for _ in range(runs))


# Raw ONNX Runtime at the batch size the server formed in the block just measured
# (its mean, rounded): the same work, without HTTP, decoding and queueing.
sat = {(k, m): [] for k in ("served", "raw") for m in models}
formed = {m: [] for m in models}
for _ in range(a.rounds):
    for m in models:
        s0, c0 = batches_formed(m)
        sat[("served", m)].append(saturate(m))
        s1, c1 = batches_formed(m)
        b = max(1, round((s1 - s0) / max(1.0, c1 - c0)))
        formed[m].append(b)
        batches.setdefault(b, np.random.default_rng(0).normal(size=(b, 3, 224, 224)).astype(np.float32))
        time.sleep(GAP)
        sat[("raw", m)].append(raw_at(m, b))
        time.sleep(GAP)
p50 = {k: statistics.median(v) * 1e3 for k, v in seq.items()}
ips = {k: statistics.median(v) for k, v in sat.items()}
for k in ("served", "raw"):
    print(f"{k} p50 at concurrency 1 (raw: b1): {fp32} {p50[(k, fp32)]:.1f} ms, {int8} {p50[(k, int8)]:.1f} ms -> INT8 speed-up {p50[(k, fp32)] / p50[(k, int8)]:.3f}x")
for k in ("served", "raw"):
    what = f"{a.concurrency} clients" if k == "served" else f"at the server's batch sizes {formed}"
    print(f"{k} at saturation ({what}): {fp32} {ips[(k, fp32)]:.2f} img/s, {int8} {ips[(k, int8)]:.2f} img/s -> INT8 {ips[(k, int8)] / ips[(k, fp32)]:.3f}x")
for m in models:
    print(f"served / raw, {m}: saturation {ips[('served', m)] / ips[('raw', m)]:.3f} (throughput), p50 c=1 {p50[('served', m)] / p50[('raw', m)]:.3f} (time)")
