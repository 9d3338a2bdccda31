#!/usr/bin/env python3
"""Two models served one after the other, against each alone, on one running server:
what one model's intra-op threads cost the next model's run. Medians of `--n`
sequential `POST /predict` of a 224-px test JPEG per pattern; prints each and the
ratio alternating / alone (1.0 = no interference).

    .venv/bin/python bench/mixed.py --port 8090 [--a weighted] [--b weighted-int8] [--n 10]
"""
import argparse, glob, json, os, statistics, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--a", default="weighted")
ap.add_argument("--b", default="weighted-int8")
ap.add_argument("--n", type=int, default=10)
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
a = ap.parse_args()
body = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()


def predict(model):
    req = urllib.request.Request(f"http://127.0.0.1:{a.port}/predict?model={model}", data=body,
                                 headers={"Content-Type": "image/jpeg"})
    t = time.perf_counter()
    json.loads(urllib.request.urlopen(req).read())
    return (time.perf_counter() - t) * 1e3


for _ in range(3):
    predict(a.a), predict(a.b)
alone_a = statistics.median(predict(a.a) for _ in range(a.n))
alone_b = statistics.median(predict(a.b) for _ in range(a.n))
pairs = [(predict(a.a), predict(a.b)) for _ in range(a.n)]
alt_a = statistics.median(p for p, _ in pairs)
alt_b = statistics.median(q for _, q in pairs)
print(f"{a.a}: alone {alone_a:.1f} ms, after {a.b} {alt_a:.1f} ms -> {alt_a / alone_a:.3f}")
print(f"{a.b}: alone {alone_b:.1f} ms, after {a.a} {alt_b:.1f} ms -> {alt_b / alone_b:.3f}")
