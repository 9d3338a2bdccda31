#!/usr/bin/env python3
"""INT8 against FP32, served and raw, in one run on one server (which loads `models/`,
so both `<name>` and `<name>-int8`). Everything is interleaved in time, so the drift
of a shared machine (30 % between minutes here) hits all four columns alike:

- p50 at concurrency 1: each of `--n` rounds sends one POST /predict per model and
  runs raw ONNX Runtime b1 once per model (Python, same files, `--threads` intra-op
  threads, ONNX Runtime's defaults otherwise), the four in a random order (a fixed
  order puts each column always after the same one: a position effect would read as
  a difference), and reads the server's own timings of each answer (`timings_ms`), so
  the served time splits into inference, the server's other steps and HTTP;
- saturation: each of `--rounds` rounds runs, per model, a block of `--n-sat`
  requests from `--concurrency` clients, then raw ONNX Runtime for as many images at
  the batch size the server formed in that block (mean of its `cxr_batch_size`,
  rounded), and at each of `--raw-batches` (raw ONNX Runtime's best of them is the
  harder baseline: a server that forms slow batches is measured against it); medians
  over rounds.

A pause (`--gap`, 150 ms) separates any two runs: ONNX Runtime's intra-op threads spin
after each run (by default; here they burned 30-50 ms of CPU within 40 ms of a run,
in the server and in Python alike), and one side's spinning tail would slow the
other's next run. Prints INT8 / FP32 (served and raw) and served / raw per model.

    .venv/bin/python bench/int8.py --port 8090 [--model weighted] [--n 40] [--concurrency 8]
"""
import json, os, random, statistics, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

ap = serving.parser(__doc__)
ap.add_argument("--port", type=int, default=8090)
ap.add_argument("--model", default="weighted")
ap.add_argument("--n", type=int, default=40)
ap.add_argument("--n-sat", type=int, default=48)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--raw-batches", default="1,2,4,8")
ap.add_argument("--gap", type=float, default=0.15, help="seconds between runs")
a = ap.parse_args()
body = serving.test_jpeg(a.data)
fp32, int8 = a.model, a.model + "-int8"
models = (fp32, int8)


GAP = a.gap  # s between runs: ONNX Runtime's threads spin after each run (its default),
# and a spinning tail of one would slow the other


def served(model):
    return serving.predict(a.port, model, body)


def served_timed(model):
    """One POST /predict: (seconds, the answer's own timings_ms)."""
    t, answer = serving.predict_answer(a.port, model, body)
    return t, json.loads(answer)["timings_ms"]


sessions = {m: serving.raw_session(a.models_dir, m, a.threads) for m in models}
batches = {b: serving.noise(b) for b in (1, 4)}


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
parts = {m: [] for m in models}
rng = random.Random(0)
for _ in range(a.n):
    runs = [(k, m) for k in ("served", "raw") for m in models]
    rng.shuffle(runs)
    for k, m in runs:
        if k == "served":
            t, timings = served_timed(m)
            seq[(k, m)].append(t)
            parts[m].append(timings)
        else:
            seq[(k, m)].append(raw(m, 1))
        time.sleep(GAP)


def saturate(model):
    return serving.saturate(a.port, model, body, a.n_sat, a.concurrency)


def batches_formed(model):
    """(sum, count) of the server's cxr_batch_size histogram for `model`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{a.port}/metrics").read().decode()
    get = lambda k: next((float(l.split()[-1]) for l in text.splitlines() if l.startswith(f'cxr_batch_size_{k}{{model="{model}"}}')), 0.0)
    return get("sum"), get("count")


def raw_at(model, b):
    return serving.raw_rate(sessions[model], batches[b], a.n_sat)


# Raw ONNX Runtime at the batch size the server formed in the block just measured
# (its mean, rounded): the same work, without HTTP, decoding and queueing.
raw_sizes = [int(b) for b in a.raw_batches.split(",")]
for b in raw_sizes:
    batches.setdefault(b, serving.noise(b))
sat = {(k, m): [] for k in ("served", "raw") for m in models}
at_size = {(m, b): [] for m in models for b in raw_sizes}
formed = {m: [] for m in models}
for _ in range(a.rounds):
    for m in models:
        s0, c0 = batches_formed(m)
        sat[("served", m)].append(saturate(m))
        s1, c1 = batches_formed(m)
        b = max(1, round((s1 - s0) / max(1.0, c1 - c0)))
        formed[m].append(b)
        batches.setdefault(b, serving.noise(b))
        time.sleep(GAP)
        sat[("raw", m)].append(raw_at(m, b))
        time.sleep(GAP)
        for rb in raw_sizes:
            at_size[(m, rb)].append(raw_at(m, rb))
            time.sleep(GAP)
p50 = {k: statistics.median(v) * 1e3 for k, v in seq.items()}
ips = {k: statistics.median(v) for k, v in sat.items()}
for k in ("served", "raw"):
    print(f"{k} p50 at concurrency 1 (raw: b1): {fp32} {p50[(k, fp32)]:.1f} ms, {int8} {p50[(k, int8)]:.1f} ms -> INT8 speed-up {p50[(k, fp32)] / p50[(k, int8)]:.3f}x")
for k in ("served", "raw"):
    what = f"{a.concurrency} clients" if k == "served" else f"at the server's batch sizes {formed}"
    print(f"{k} at saturation ({what}): {fp32} {ips[(k, fp32)]:.2f} img/s, {int8} {ips[(k, int8)]:.2f} img/s -> INT8 {ips[(k, int8)] / ips[(k, fp32)]:.3f}x")
for m in models:
    med = lambda f: statistics.median(f(p) for p in parts[m])
    inf = med(lambda p: p["inference"])
    rest = med(lambda p: p["total"] - p["inference"])
    http = statistics.median(s * 1e3 - p["total"] for s, p in zip(seq[("served", m)], parts[m]))
    print(f"served {m} at concurrency 1, medians (ms): inference {inf:.1f} in the server vs raw {p50[('raw', m)]:.1f}; "
          f"the server's other steps {rest:.2f} (decode {med(lambda p: p['decode']):.2f}, queue {med(lambda p: p['queue']):.2f}); HTTP and client {http:.2f}")
for m in models:
    print(f"served / raw, {m}: saturation {ips[('served', m)] / ips[('raw', m)]:.3f} (throughput), p50 c=1 {p50[('served', m)] / p50[('raw', m)]:.3f} (time)")
for m in models:
    each = {b: statistics.median(at_size[(m, b)]) for b in raw_sizes}
    best = max(each, key=each.get)
    sizes = ", ".join(f"b{b} {v:.2f}" for b, v in each.items())
    print(f"raw {m} by batch size (img/s): {sizes}; served / best raw (b{best}): {ips[('served', m)] / each[best]:.3f}")
