"""What the serving benchmarks share (bench/int8.py, bench/max_batch.py): their
common arguments, the request body (the first NORMAL test JPEG of the 224-px data),
one POST /predict, closed-loop saturation, and raw ONNX Runtime sessions at the same
thread count.

Each client thread keeps one HTTP/1.1 connection open (as a gateway in front of the
service does, and wrk, hey or k6 by default); until 2026-11-27 the benchmarks opened
a connection per request (urllib), which added 0.6-0.9 ms to every served time here."""
import argparse, concurrent.futures as cf, glob, http.client, os, socket, threading, time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))


def parser(doc):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-dir", default=os.path.join(HERE, "..", "models"))
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "chest_xray_224"))
    return ap


def free_port():
    """A port nothing listens on now (for a server the benchmark starts)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_line():
    """The machine, as a RESULTS entry names it: model, cores, the SIMD flags."""
    try:
        info = open("/proc/cpuinfo").read()
        model = [l for l in info.splitlines() if l.startswith("model name")][0].split(":", 1)[1].strip()
        flags = set(info.split("flags", 1)[1].split("\n", 1)[0].split())
        keep = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                if f in flags]
        return f"{model}; {os.cpu_count()} cores; flags {' '.join(keep)}"
    except Exception:
        return "unknown CPU"


def test_jpeg(data):
    return open(sorted(glob.glob(os.path.join(data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()


_local = threading.local()


def _connection(port):
    conns = _local.__dict__.setdefault("conns", {})
    if port not in conns:
        conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    return conns[port]


def predict(port, model, body):
    """One POST /predict on this thread's connection; its seconds."""
    return predict_answer(port, model, body)[0]


def predict_answer(port, model, body):
    """One POST /predict on this thread's connection: (its seconds, the answer)."""
    c = _connection(port)
    t = time.time()
    try:
        c.request("POST", f"/predict?model={model}", body=body, headers={"Content-Type": "image/jpeg"})
        r = c.getresponse()
    except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
        # The server closed a connection idle past its keep-alive timeout (as it
        # should); a client opens a new one, and the time counts from there.
        c.close()
        _local.conns.pop(port)
        c = _connection(port)
        t = time.time()
        c.request("POST", f"/predict?model={model}", body=body, headers={"Content-Type": "image/jpeg"})
        r = c.getresponse()
    answer = r.read()
    took = time.time() - t
    if r.status != 200:
        raise RuntimeError(f"POST /predict?model={model}: {r.status}")
    return took, answer


def saturate(port, model, body, n, concurrency):
    """Images per second of `n` requests from `concurrency` clients in a closed loop."""
    t = time.time()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda _: predict(port, model, body), range(n)))
    return n / (time.time() - t)


def raw_session(models_dir, model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(os.path.join(models_dir, model + ".onnx"), so, providers=["CPUExecutionProvider"])


def raw_rate(session, x, n):
    """Images per second of raw ONNX Runtime running batch `x` back to back for about
    `n` images (at least one run)."""
    b = len(x)
    runs = max(1, n // b)
    t = time.time()
    for _ in range(runs):
        session.run(["probabilities"], {"image": x})
    return b * runs / (time.time() - t)


def noise(b):
    return np.random.default_rng(0).normal(size=(b, 3, 224, 224)).astype(np.float32)
