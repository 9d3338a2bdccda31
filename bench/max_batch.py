#!/usr/bin/env python3
"""Which --max-batch serves more images per second: two servers on the same models/,
started with different --max-batch (A and B), loaded alternately by the same closed
loop of `--concurrency` clients, block by block, with raw ONNX Runtime at each of
`--raw-batches` between them (so the machine's drift hits every column alike).
Prints medians over `--rounds` and B / A.

    scripts/serve.sh --port 8090 --max-batch 2 &  scripts/serve.sh --port 8091 --max-batch 8 &
    .venv/bin/python bench/max_batch.py --a 8090 --b 8091 [--models weighted,weighted-int8]
"""
import os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

ap = serving.parser(__doc__)
ap.add_argument("--a", type=int, default=8090)
ap.add_argument("--b", type=int, default=8091)
ap.add_argument("--models", default="weighted,weighted-int8")
ap.add_argument("--n", type=int, default=48)
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--raw-batches", default="2,8")
a = ap.parse_args()
body = serving.test_jpeg(a.data)
models = a.models.split(",")
sizes = [int(b) for b in a.raw_batches.split(",")]
GAP = 0.05
sessions = {m: serving.raw_session(a.models_dir, m, a.threads) for m in models}
inputs = {b: serving.noise(b) for b in sizes}


for m in models:
    for port in (a.a, a.b):
        for _ in range(4):
            serving.predict(port, m, body)
cols = [("A", a.a), ("B", a.b)]
res = {(m, k): [] for m in models for k in ["A", "B"] + [f"raw b{b}" for b in sizes]}
for r in range(a.rounds):
    for m in models:
        order = cols if r % 2 == 0 else cols[::-1]
        for k, port in order:
            res[(m, k)].append(serving.saturate(port, m, body, a.n, a.concurrency))
            time.sleep(GAP)
        for b in sizes:
            res[(m, f"raw b{b}")].append(serving.raw_rate(sessions[m], inputs[b], a.n))
            time.sleep(GAP)
for m in models:
    med = {k: statistics.median(v) for (mm, k), v in res.items() if mm == m}
    cells = ", ".join(f"{k} {v:.2f}" for k, v in med.items())
    best = max(v for k, v in med.items() if k.startswith("raw"))
    print(f"{m} img/s ({a.concurrency} clients; A = port {a.a}, B = port {a.b}): {cells}; B / A {med['B'] / med['A']:.3f}; A / best raw {med['A'] / best:.3f}, B / best raw {med['B'] / best:.3f}")
