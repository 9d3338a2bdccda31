#!/usr/bin/env python3
"""A version rollout under steady load, then a shadow's cost at concurrency 1,
against the real cxr-serve (release build) on the committed models.

Rollout (--clients 4 for --seconds 60): the server starts with `weighted` 2.0.0
only (models/weighted/2.0.0/, the committed FP32 file). While the clients send
test-split films without naming a version:
  t = 25 %  a corrupted 2.2.0 (its ONNX file no longer matches its card) is
            loaded through the repository API: it must be refused (400) with
            serving untouched;
  t = 33 %  2.1.0 (the committed INT8 copy, its card renamed to weighted 2.1.0)
            is put on disk and loaded with {"default": true}: loaded and warmed,
            then swapped in;
  t = 66 %  2.0.0 is unloaded.
It reports every request's status (all must be 200: zero failed or refused),
that every answer names a version, that each client's answers switch version
exactly once, /ready polled every 50 ms (never anything but 200), the load
call's time, and latency before, during and after the swap.

Shadow (--shadow-n requests at concurrency 1, A/B/A/B on one server each way):
2.0.0 answering, with and without `--shadow weighted@2.1.0` (share 1), each
request followed by --think-ms of client think time (a modality or a RIS does
not send its next film the instant it gets an answer). Reports the median and
p90 latency of each, their ratio, the shadow runs and sheds, and that the
answers are byte-identical apart from timings and request ids. A second run
with no think time shows the shadow shed (`load`) rather than slowing answers.

    python3 bench/rollout.py [--seconds 60] [--clients 4] [--shadow-n 200]
"""
import argparse, glob, hashlib, json, os, shutil, signal, statistics, subprocess
import sys, tempfile, threading, time, http.client

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ap = argparse.ArgumentParser()
ap.add_argument("--seconds", type=float, default=60)
ap.add_argument("--clients", type=int, default=4)
ap.add_argument("--shadow-n", type=int, default=200)
ap.add_argument("--think-ms", type=float, default=400)
ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cxr-serve"))
ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "chest_xray_224"))
ap.add_argument("--skip-rollout", action="store_true")
ap.add_argument("--skip-shadow", action="store_true")
a = ap.parse_args()

KEY = "bench-rollout-admin-key"
films = sorted(glob.glob(os.path.join(a.data, "test", "*", "*.jpeg")))
bodies = [open(f, "rb").read() for f in films[:: max(1, len(films) // 200)]]


def cpu_flags():
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
        model = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
        keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
        return f"{model}; {os.cpu_count()} cores; {' '.join(keep)}"
    except Exception:
        return "unknown"


def version_dir(models, version, source, ood=True):
    """models/weighted/<version>/ from the committed card `source`."""
    d = os.path.join(models, "weighted", version)
    os.makedirs(d, exist_ok=True)
    card = json.load(open(os.path.join(ROOT, "models", f"{source}.json")))
    card["name"], card["version"] = "weighted", version
    os.symlink(os.path.join(ROOT, "models", card["onnx"]["file"]), os.path.join(d, "weighted.onnx"))
    card["onnx"]["file"] = "weighted.onnx"
    if card.get("ood"):
        os.symlink(os.path.join(ROOT, "models", card["ood"]["file"]), os.path.join(d, card["ood"]["file"]))
    json.dump(card, open(os.path.join(d, "weighted.json"), "w"), indent=1)
    return d


def start(models, extra=()):
    keys = os.path.join(models, "..", "keys.toml")
    with open(keys, "w") as f:
        f.write('[[callers]]\nname = "ops"\nkey_sha256 = "%s"\nscopes = ["predict", "models", "admin"]\n'
                % hashlib.sha256(KEY.encode()).hexdigest())
    p = subprocess.Popen([a.bin, "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
                          "--api-keys-file", keys, "--models-dir", models, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = None
    for line in p.stdout:
        v = json.loads(line)
        addr = v.get("fields", {}).get("addr")
        if addr:
            port = int(addr.rsplit(":", 1)[1])
            break
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    if port is None:
        sys.exit("the server did not start")
    return p, port


def request(port, method, path, body=b"", ct="image/jpeg", key=KEY):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body, headers={"Content-Type": ct, "Authorization": f"Bearer {key}"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def admin(port, path, params):
    t = time.time()
    s, b = request(port, "POST", path, json.dumps({"parameters": params}).encode(), "application/json")
    return s, json.loads(b or b"null"), time.time() - t


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")


def rollout():
    work = tempfile.mkdtemp(prefix="cxr-rollout-")
    models = os.path.join(work, "models")
    version_dir(models, "2.0.0", "weighted")
    p, port = start(models)
    try:
        for i in range(3):
            request(port, "POST", "/predict", bodies[i])
        stop = threading.Event()
        seen = [[] for _ in range(a.clients)]
        ready_fail = [0, 0]

        def client(c):
            i = c
            while not stop.is_set():
                t = time.time()
                s, b = request(port, "POST", "/predict", bodies[i % len(bodies)])
                v = json.loads(b).get("model", {}).get("version") if s == 200 else None
                seen[c].append((t, time.time() - t, s, v, b if s != 200 else None))
                i += a.clients

        def ready():
            while not stop.is_set():
                s, _ = request(port, "GET", "/ready")
                ready_fail[0] += 1
                ready_fail[1] += s != 200
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        threads.append(threading.Thread(target=ready))
        t0 = time.time()
        for t in threads:
            t.start()
        events = {}
        time.sleep(a.seconds * 0.25)
        d = version_dir(models, "2.2.0", "weighted-int8")
        onnx = os.path.join(d, "weighted.onnx")
        data = bytearray(open(os.path.realpath(onnx), "rb").read())
        data[len(data) // 2] ^= 0xFF
        os.remove(onnx)
        open(onnx, "wb").write(data)
        events["corrupt"] = (time.time() - t0, *admin(port, "/v2/repository/models/weighted/load",
                                                       {"version": "2.2.0", "default": True}))
        time.sleep(max(0, a.seconds * 0.33 - (time.time() - t0)))
        version_dir(models, "2.1.0", "weighted-int8")
        events["load"] = (time.time() - t0, *admin(port, "/v2/repository/models/weighted/load",
                                                    {"version": "2.1.0", "default": True}))
        time.sleep(max(0, a.seconds * 0.66 - (time.time() - t0)))
        events["unload"] = (time.time() - t0, *admin(port, "/v2/repository/models/weighted/unload",
                                                      {"version": "2.0.0"}))
        time.sleep(max(0, a.seconds - (time.time() - t0)))
        stop.set()
        for t in threads:
            t.join()
        s, index = request(port, "POST", "/v2/repository/index", b"{}", "application/json")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    allr = [r for s in seen for r in s]
    failed = [r for r in allr if r[2] != 200]
    unnamed = [r for r in allr if r[2] == 200 and not r[3]]
    switches = []
    for s in seen:
        vs = [r[3] for r in s if r[2] == 200]
        switches.append(sum(1 for x, y in zip(vs, vs[1:]) if x != y))
    lt, ls, lb, ldt = events["load"]
    ut, us, ub, _ = events["unload"]
    ct, cs, cb, _ = events["corrupt"]
    before = [r[1] for r in allr if r[0] - t0 < lt]
    during = [r[1] for r in allr if lt <= r[0] - t0 < lt + ldt]
    after = [r[1] for r in allr if r[0] - t0 >= lt + ldt]
    print(f"## Rollout under load ({a.clients} clients, {a.seconds:.0f} s) — {cpu_flags()}")
    print(f"requests {len(allr)}, failed or refused {len(failed)}, answers naming no version {len(unnamed)}")
    for r in failed[:5]:
        print("  failed:", r[2], r[4][:200])
    print(f"version switches per client stream: {switches} (each must be 1)")
    print(f"/ready polls {ready_fail[0]}, not 200: {ready_fail[1]}")
    print(f"t={ct:.1f} s load of corrupted 2.2.0 -> {cs} {str(cb)[:160]}")
    print(f"t={lt:.1f} s load of 2.1.0 (INT8) as default -> {ls} {lb.get('loaded')} defaults {lb.get('defaults')}; "
          f"load+warm+swap took {ldt:.2f} s")
    print(f"t={ut:.1f} s unload of 2.0.0 -> {us} {ub.get('unloaded')}")
    print(f"latency p50/p99 ms: before the load {pct(before, .5):.0f}/{pct(before, .99):.0f} "
          f"(n={len(before)}); while loading {pct(during, .5):.0f}/{pct(during, .99):.0f} (n={len(during)}); "
          f"after {pct(after, .5):.0f}/{pct(after, .99):.0f} (n={len(after)})")
    by_v = {}
    for r in allr:
        by_v[r[3]] = by_v.get(r[3], 0) + 1
    print(f"answers by version: {by_v}")
    print("index:", [(e["version"], e["state"], e.get("default", False), e["reason"][:60]) for e in json.loads(index)])
    ok = not failed and not unnamed and all(s == 1 for s in switches) and ready_fail[1] == 0 \
        and cs == 400 and ls == 200 and us == 200
    print("PASS" if ok else "FAIL")
    return ok


def strip(b):
    v = json.loads(b)
    v.pop("timings_ms", None)
    v.pop("request_id", None)
    return json.dumps(v, sort_keys=True)


def shadow():
    work = tempfile.mkdtemp(prefix="cxr-shadow-")
    models = os.path.join(work, "models")
    version_dir(models, "2.0.0", "weighted")
    version_dir(models, "2.1.0", "weighted-int8")
    open(os.path.join(models, "weighted", "DEFAULT"), "w").write("2.0.0")
    results = {}
    answers = {}
    try:
        for think in (a.think_ms, 0):
            for rnd in range(2):  # A/B/A/B
                for label, extra in (("plain", []), ("shadow", ["--shadow", "weighted@2.1.0"])):
                    p, port = start(models, extra)
                    try:
                        for i in range(5):
                            request(port, "POST", "/predict", bodies[i])
                        lat = []
                        for i in range(a.shadow_n // 2):
                            body = bodies[(i + rnd * 7) % len(bodies)]
                            t = time.time()
                            s, b = request(port, "POST", "/predict", body)
                            lat.append(time.time() - t)
                            assert s == 200, b
                            answers.setdefault((think, label), {})[hashlib.sha256(body).hexdigest()] = strip(b)
                            if think:
                                time.sleep(think / 1e3)
                        time.sleep(3)
                        _, info = request(port, "GET", "/models/weighted")
                        sh = json.loads(info).get("shadow")
                        results.setdefault((think, label), {"lat": [], "runs": 0, "shed": {}})
                        r = results[(think, label)]
                        r["lat"] += lat
                        r.setdefault("rounds", []).append(pct(lat, .5))
                        if sh:
                            r["runs"] += sh["agreement"]["overall"]["images"]
                            for k, n in sh["agreement"]["shed"].items():
                                r["shed"][k] = r["shed"].get(k, 0) + n
                            r["agreement"] = sh["agreement"]["overall"]
                    finally:
                        p.send_signal(signal.SIGTERM)
                        p.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"## Shadow at concurrency 1 (A/B/A/B, {a.shadow_n} requests each way) — {cpu_flags()}")
    ok = True
    for think in (a.think_ms, 0):
        pl, sh = results[(think, "plain")], results[(think, "shadow")]
        same = answers[(think, "plain")] == answers[(think, "shadow")]
        ok &= same
        print(f"think {think:.0f} ms: plain p50/p90 {pct(pl['lat'], .5):.1f}/{pct(pl['lat'], .9):.1f} ms; "
              f"with shadow {pct(sh['lat'], .5):.1f}/{pct(sh['lat'], .9):.1f} ms; "
              f"ratio p50 {pct(sh['lat'], .5) / pct(pl['lat'], .5):.3f}; shadow runs {sh['runs']}, shed {sh['shed']}; "
              f"answers identical apart from timings and ids: {same}")
        print(f"  p50 per round (A/B/A/B): plain {[round(x, 1) for x in pl['rounds']]}, "
              f"shadow {[round(x, 1) for x in sh['rounds']]}")
        if sh.get("agreement"):
            ag = sh["agreement"]
            print(f"  last server's agreement: {ag['agreed']}/{ag['images']} labels, mean |dp| {ag['mean_abs_delta_p']}")
    print("PASS" if ok else "FAIL")
    return ok


ok = True
if not a.skip_rollout:
    ok &= rollout()
if not a.skip_shadow:
    ok &= shadow()
sys.exit(0 if ok else 1)
