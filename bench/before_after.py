"""Served latency and throughput of two cxr-serve binaries on the same model, in the
same run: c=1 p50 and saturation (8 clients) through POST /predict and through the
Open Inference Protocol over gRPC (tritonclient). The binaries take turns, one server
at a time, the order alternating each round, so both see the same machine; the
ratios after/before are what to read (issue #44: the refactor must not slow the
served path).

  .venv/bin/python bench/before_after.py --before /path/old/cxr-serve \
      --after target/release/cxr-serve --model weighted --rounds 4
"""
import concurrent.futures as cf
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402


def one_model_dir(models_dir, model):
    """A folder with just `model`'s files (start-up loads one model, not four)."""
    d = tempfile.mkdtemp(prefix="cxr-ab-")
    for f in os.listdir(models_dir):
        if f.split(".")[0] == model and os.path.isfile(os.path.join(models_dir, f)):
            shutil.copy(os.path.join(models_dir, f), d)
    return d


def run_one(binary, models, model, body, a):
    http_port, grpc_port = serving.free_port(), serving.free_port()
    p = subprocess.Popen(
        [binary, "--models-dir", models, "--host", "127.0.0.1", "--port", str(http_port),
         "--grpc-port", str(grpc_port), "--device", "cpu", "--backend", "ort",
         "--intra-threads", str(a.threads), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                # Not serving.predict: its kept connection is spoiled by a refused one.
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=5)
                break
            except Exception:
                if time.time() > deadline or p.poll() is not None:
                    raise SystemExit(f"{binary} did not get ready")
                time.sleep(0.5)
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def grpc():
            i = grpcclient.InferInput("image", [1], "BYTES")
            i.set_data_from_numpy(np.array([body], dtype=np.object_))
            t = time.time()
            g.infer(model, [i], outputs=[grpcclient.InferRequestedOutput("probabilities")])
            return time.time() - t

        def rest():
            return serving.predict(http_port, model, body)

        out = {}
        for name, f in (("POST /predict", rest), ("V2 gRPC", grpc)):
            with cf.ThreadPoolExecutor(a.concurrency) as ex:  # warm every batch size
                list(ex.map(lambda _: f(), range(a.concurrency * 2)))
            p50 = statistics.median(f() for _ in range(a.n1))
            t = time.time()
            with cf.ThreadPoolExecutor(a.concurrency) as ex:
                list(ex.map(lambda _: f(), range(a.nsat)))
            out[name] = (p50 * 1e3, a.nsat / (time.time() - t))
        return out
    finally:
        p.terminate()
        p.wait(30)


def main():
    ap = serving.parser(__doc__)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--model", default="weighted")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--n1", type=int, default=30)
    ap.add_argument("--nsat", type=int, default=48)
    a = ap.parse_args()
    body = serving.test_jpeg(a.data)
    models = one_model_dir(a.models_dir, a.model)
    res = {"before": [], "after": []}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            res[which].append(run_one(getattr(a, which), models, a.model, body, a))
            print(f"round {r + 1} {which}: " + ", ".join(
                f"{k} p50 {v[0]:.1f} ms, {v[1]:.2f} img/s" for k, v in res[which][-1].items()), flush=True)
    print(f"\n{a.model}, {a.rounds} rounds, median of rounds (after / before):")
    for way in res["before"][0]:
        b50 = statistics.median(x[way][0] for x in res["before"])
        a50 = statistics.median(x[way][0] for x in res["after"])
        bs = statistics.median(x[way][1] for x in res["before"])
        as_ = statistics.median(x[way][1] for x in res["after"])
        print(f"  {way}: c=1 p50 {b50:.1f} → {a50:.1f} ms ({a50 / b50:.3f}×); "
              f"saturation {bs:.2f} → {as_:.2f} img/s ({as_ / bs:.3f}×)")
    shutil.rmtree(models)


if __name__ == "__main__":
    main()
