#!/usr/bin/env python3
"""Train/serve parity on the test split: POSTs every test image to a running
cxr-serve once per variant and checks that the accuracy and confusion matrix
computed from the answers equal the model card's test metrics, and that the AUC and
ECE computed from the served probabilities (calibrated, as served) equal the card's:
AUC within 1e-4, ECE within 2e-3 (the server batches images differently from the
trainer's measurement, which moves ONNX Runtime's last bits, and one image crossing
an ECE bin edge moves the ECE by up to 1/624).

    bash scripts/serve.sh &                      # in another shell
    python3 scripts/check_served_metrics.py [--url http://127.0.0.1:8080] \
        [--data ../shared/data/chest_xray_224/test] [--models weighted,augmented]

When `models/<name>.test-scores.json` exists (written by cxr-train at export, or by
`cxr-train test-scores` for a shipped file), every served probability must also lie
within 1e-5 of cxr-train's for that image, with the same label. A server on another
backend than cxr-train's ONNX Runtime (`--backend openvino`: other INT8 kernels) is
checked with `--tolerance` (e.g. 2e-2, the load-time probe's bound for INT8 files)
or with `--labels-only`: every image's label must still equal cxr-train's, and the
confusion matrix and accuracy the card's; AUC, ECE and the probabilities outside
the tolerance are then reported, not required.

Standard library only. Exits non-zero on any mismatch or failed request.
"""
import argparse, json, os, struct, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)

def predict(url, model, path):
    with open(path, "rb") as f:
        body = f.read()
    ct = "image/png" if path.lower().endswith(".png") else "image/jpeg"
    req = urllib.request.Request(f"{url}/predict?model={model}", data=body, headers={"Content-Type": ct}, method="POST")
    for attempt in range(20):
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 503 and attempt < 19:  # overloaded: honour Retry-After
                time.sleep(float(e.headers.get("Retry-After", "1")))
                continue
            raise SystemExit(f"{path}: HTTP {e.code} {e.read().decode(errors='replace')}")

def auc(scores, labels):
    """Mann-Whitney AUC, ties counting one half (as src/eval computes it)."""
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rp = sum(r for r, l in zip(ranks, labels) if l == 1)
    return (rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))

def ece(scores, labels, threshold, bins=10):
    """Expected calibration error of the answered label's confidence (src/eval)."""
    count, correct, conf = [0] * bins, [0] * bins, [0.0] * bins
    for s, l in zip(scores, labels):
        pred = s >= threshold
        c = s if pred else 1 - s
        # Below 0.5 (a threshold under 0.5) goes to the first bin, as in src/eval.
        b = max(0, min(int((c - 0.5) * 2 * bins), bins - 1))
        count[b] += 1; conf[b] += c; correct[b] += pred == (l == 1)
    n = len(scores)
    return sum(count[b] / n * abs(correct[b] / count[b] - conf[b] / count[b]) for b in range(bins) if count[b])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224", "test"))
    ap.add_argument("--models", default="")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--models-dir", default=os.path.join(os.path.dirname(__file__), "..", "models"),
                    help="where <name>.test-scores.json (cxr-train's per-image scores) are")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="most |served - cxr-train| P(PNEUMONIA) per image")
    ap.add_argument("--labels-only", action="store_true",
                    help="labels and confusion must match; AUC/ECE only reported")
    a = ap.parse_args()
    for _ in range(600):
        try:
            get(f"{a.url}/ready"); break
        except Exception:
            time.sleep(1)
    listing = get(f"{a.url}/models")["models"]
    cards = {m["card"]["name"]: m["card"] for m in listing}
    names = [n for n in a.models.split(",") if n] or sorted(cards)
    files = []
    for label, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        d = os.path.join(a.data, cls)
        files += [(os.path.join(d, f), label) for f in sorted(os.listdir(d)) if f.lower().endswith((".jpeg", ".jpg", ".png"))]
    ok = True
    print(f"{len(files)} test images from {os.path.abspath(a.data)}")
    print("| model | served accuracy | card accuracy | served confusion (tp fp tn fn) | card confusion | match |")
    print("|---|---|---|---|---|---|")
    for name in names:
        card = cards[name]
        with ThreadPoolExecutor(a.concurrency) as ex:
            answers = list(ex.map(lambda f: predict(a.url, name, f[0]), files))
        c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        for (path, label), ans in zip(files, answers):
            assert ans["model"]["name"] == name, ans
            pred = 1 if ans["label"] == "PNEUMONIA" else 0
            c[{(1, 1): "tp", (0, 1): "fp", (0, 0): "tn", (1, 0): "fn"}[(label, pred)]] += 1
        acc = (c["tp"] + c["tn"]) / len(files)
        test = (card.get("metrics") or {}).get("test") or {}
        cc = test.get("confusion", {})
        # The answers' f32 probabilities, exactly (JSON gives the shortest decimal).
        scores = [struct.unpack("f", struct.pack("f", float(ans["probabilities"]["PNEUMONIA"])))[0] for ans in answers]
        labels = [label for _, label in files]
        served_auc, served_ece = auc(scores, labels), ece(scores, labels, card["threshold"])
        prob_match = a.labels_only or abs(served_auc - test.get("auc", -1)) < 1e-4 and abs(served_ece - test.get("ece", -1)) < 2e-3
        print(f"  {name}: served AUC {served_auc:.6f} (card {test.get('auc', float('nan')):.6f}), "
              f"ECE {served_ece:.6f} (card {test.get('ece', float('nan')):.6f})", file=sys.stderr)
        match = cc == c and abs(test.get("accuracy", -1) - acc) < 1e-12 and prob_match
        # Image by image, against cxr-train's own measurement of the same file.
        sp = os.path.join(a.models_dir, f"{name}.test-scores.json")
        if os.path.exists(sp):
            ref = json.load(open(sp))
            if ref["onnx_sha256"] != card["onnx"]["sha256"]:
                print(f"  {name}: {sp} is of another ONNX file", file=sys.stderr)
                match = False
            by_file = {i["file"]: i for i in ref["images"]}
            bad, most, outside = 0, 0.0, 0
            for (path, label), ans, p in zip(files, answers, scores):
                key = os.path.relpath(path, a.data)
                r = by_file.get(key)
                most = max(most, abs(r["p_pneumonia"] - p)) if r else most
                far = r is not None and abs(r["p_pneumonia"] - p) > a.tolerance
                outside += far
                if r is None or r["label"] != label or r["answer"] != ans["label"] or (far and not a.labels_only):
                    bad += 1
                    if bad <= 5:
                        print(f"  {name}: {key}: served {p} {ans['label']}, cxr-train {r and (r['p_pneumonia'], r['answer'])}", file=sys.stderr)
            print(f"  {name}: per image: {len(files) - bad}/{len(files)} pass; {len(files) - outside}/{len(files)} served probabilities within {a.tolerance:g} of cxr-train's (most |Δp| {most:.2e}); labels must equal cxr-train's", file=sys.stderr)
            match &= bad == 0 and len(by_file) == len(files)
        else:
            print(f"  {name}: no {sp}: per-image comparison skipped", file=sys.stderr)
        ok &= match
        fmt = lambda d: " ".join(str(d.get(k)) for k in ("tp", "fp", "tn", "fn"))
        print(f"| {name} | {acc:.4f} | {test.get('accuracy', float('nan')):.4f} | {fmt(c)} | {fmt(cc)} | {'yes' if match else 'NO'} |")
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
