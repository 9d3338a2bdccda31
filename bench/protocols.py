"""The three ways in, one model, one run: POST /predict (a JPEG body),
the Open Inference Protocol over REST (tritonclient.http, the file as a binary
BYTES tensor) and over gRPC (tritonclient.grpc, raw_input_contents). At concurrency
1 (median latency) and at saturation (images per second, closed loop), the three
interleaved round by round so drift hits them alike. Starts its own cxr-serve.

    cargo build --release --bin cxr-serve
    .venv/bin/python bench/protocols.py [--model weighted-int8] [--concurrency 8]
"""
import concurrent.futures as cf, os, statistics, subprocess, sys, time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = serving.parser(__doc__)
    ap.add_argument("--model", default="weighted-int8")
    ap.add_argument("--n1", type=int, default=30, help="requests per protocol per round at concurrency 1")
    ap.add_argument("--nsat", type=int, default=48, help="requests per protocol per round at saturation")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    body = serving.test_jpeg(a.data)
    http_port, grpc_port = serving.free_port(), serving.free_port()
    server = subprocess.Popen(
        [os.path.join(HERE, "..", "target", "release", "cxr-serve"), "--models-dir", a.models_dir,
         "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port),
         "--device", "cpu", "--intra-threads", str(a.threads), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpclient.InferenceServerClient(f"127.0.0.1:{http_port}").is_server_ready():
                    break
            except Exception:
                pass
            if time.time() > deadline:
                raise SystemExit("the server did not get ready")
            time.sleep(0.5)

        import threading
        local = threading.local()

        def rest_v2():
            c = local.__dict__.setdefault("rest", httpclient.InferenceServerClient(f"127.0.0.1:{http_port}"))
            i = httpclient.InferInput("image", [1], "BYTES")
            i.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=True)
            t = time.time()
            c.infer(a.model, [i], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)])
            return time.time() - t

        def grpc():
            c = local.__dict__.setdefault("grpc", grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))
            i = grpcclient.InferInput("image", [1], "BYTES")
            i.set_data_from_numpy(np.array([body], dtype=np.object_))
            t = time.time()
            c.infer(a.model, [i], outputs=[grpcclient.InferRequestedOutput("probabilities")])
            return time.time() - t

        def predict():
            return serving.predict(http_port, a.model, body)

        ways = {"POST /predict": predict, "V2 REST (tritonclient.http)": rest_v2, "V2 gRPC (tritonclient.grpc)": grpc}
        for f in ways.values():  # warm every path and batch size
            with cf.ThreadPoolExecutor(a.concurrency) as ex:
                list(ex.map(lambda _: f(), range(a.concurrency * 2)))
        lat = {k: [] for k in ways}
        rate = {k: [] for k in ways}
        for _ in range(a.rounds):
            for k, f in ways.items():
                lat[k] += [f() for _ in range(a.n1)]
            for k, f in ways.items():
                t = time.time()
                with cf.ThreadPoolExecutor(a.concurrency) as ex:
                    list(ex.map(lambda _: f(), range(a.nsat)))
                rate[k].append(a.nsat / (time.time() - t))
        flags = open("/proc/cpuinfo").read()
        kept = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
        print(f"model {a.model}, {a.threads} threads, concurrency {a.concurrency} at saturation, CPU flags: {' '.join(kept)}")
        base_l = statistics.median(lat["POST /predict"]) * 1e3
        base_r = statistics.median(rate["POST /predict"])
        print("| way in | p50 latency, c=1 | vs /predict | images/s at saturation | vs /predict |")
        print("|---|---|---|---|---|")
        for k in ways:
            l = statistics.median(lat[k]) * 1e3
            r = statistics.median(rate[k])
            print(f"| {k} | {l:.1f} ms | {l / base_l:.2f}× | {r:.1f} | {r / base_r:.2f}× |")
    finally:
        server.terminate()
        server.wait(timeout=120)


if __name__ == "__main__":
    main()
