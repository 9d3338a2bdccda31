#!/usr/bin/env python3
"""What an explanation costs: sequential POST /predict of the same test JPEG to a
running cxr-serve, plain and with `explain=cam` interleaved (A/B/A/B, so both see the
same machine state), after warm-ups. Prints the medians and their ratio. The CAM
comes from the same inference (an output of the graph); the extra is the copy of the
input, the normalisation, the upsampled overlay and its PNG/base64 encoding.

    python3 bench/explain.py [--port 8090] [--n 60]
"""
import argparse, glob, json, os, statistics, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--n", type=int, default=60)
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
a = ap.parse_args()
body = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()


def one(query):
    r = urllib.request.Request(f"http://127.0.0.1:{a.port}/predict{query}", data=body, headers={"Content-Type": "image/jpeg"})
    t = time.time()
    out = json.loads(urllib.request.urlopen(r).read())
    return time.time() - t, out


for q in ("", "?explain=cam"):
    for _ in range(5):
        one(q)
plain, cam = [], []
for _ in range(a.n):
    plain.append(one("")[0])
    t, out = one("?explain=cam")
    assert "heatmap" in out, out
    cam.append(t)
mp, mc = statistics.median(plain), statistics.median(cam)
print(f"plain median {mp * 1e3:.1f} ms  explain=cam median {mc * 1e3:.1f} ms  ratio {mc / mp:.3f}  (+{(mc - mp) * 1e3:.1f} ms)")
