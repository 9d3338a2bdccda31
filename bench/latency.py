#!/usr/bin/env python3
"""One image at a time against a running cxr-serve: median and p90 of 60 sequential
POST /predict of the first test-split NORMAL JPEG, after 5 warm-ups. Run it against
two servers in turn (A/B/A/B) and compare the ratios, never absolute times across
machines.

    python3 bench/latency.py [--port 8090] [--n 60]
"""
import argparse, glob, os, statistics, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--n", type=int, default=60)
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
a = ap.parse_args()
body = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()

def one():
    r = urllib.request.Request(f"http://127.0.0.1:{a.port}/predict", data=body, headers={"Content-Type": "image/jpeg"})
    t = time.time()
    urllib.request.urlopen(r).read()
    return time.time() - t

for _ in range(5):
    one()
xs = sorted(one() for _ in range(a.n))
print(f"median {statistics.median(xs) * 1e3:.1f} ms  p90 {xs[int(0.9 * len(xs)) - 1] * 1e3:.1f} ms")
