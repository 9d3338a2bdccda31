#!/usr/bin/env python3
"""Out-of-distribution refusal, measured through a running cxr-serve (default
--ood-action refuse): for each model, the share of the 624 test images it answers,
and the share of the assembled out-of-distribution set (bench/ood_set.py) it refuses,
by category and by the error_type that refused it (the cheap gates run first; the
density model's refusal is `out_of_distribution`). Scores of answered images and of
refused ones (where the server gives one) are summarised too.

    python3 bench/ood.py --url http://127.0.0.1:8090 [--set target/ood-set] [--json out.json]

See bench/ood.sh, which assembles the set, starts the server and runs this.
"""
import argparse, collections, glob, json, os, statistics, urllib.error, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8090")
ap.add_argument("--set", default="target/ood-set")
ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
ap.add_argument("--json", default=None)
ap.add_argument("--from-json", default=None, help="use the results saved by an earlier --json run instead of measuring")
ap.add_argument("--write-cards", default=None, help="models folder: record each model's OOD-set refusal in its card's ood entry")
a = ap.parse_args()


def post(path, model):
    ctype = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "dcm": "application/dicom"}[path.rsplit(".", 1)[-1].lower()]
    r = urllib.request.Request(f"{a.url}/predict?model={model}", data=open(path, "rb").read(), headers={"Content-Type": ctype})
    try:
        return 200, json.loads(urllib.request.urlopen(r, timeout=120).read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def measure():
    models = [m["card"]["name"] for m in json.loads(urllib.request.urlopen(f"{a.url}/models").read())["models"]]
    test = sorted(glob.glob(os.path.join(a.data, "test", "*", "*")))
    ood = sorted(glob.glob(os.path.join(a.set, "*", "*")))
    assert len(test) == 624, len(test)
    out = {}
    for m in models:
        card = json.loads(urllib.request.urlopen(f"{a.url}/models/{m}").read())["card"]
        thr = card.get("ood", {}).get("threshold")
        res = {"threshold": thr, "test": collections.Counter(), "ood": {}, "test_scores": [], "ood_scores": [], "accepted_ood": []}
        for f in test:
            s, b = post(f, m)
            res["test"]["answered" if s == 200 else b["error_type"]] += 1
            if s == 200 and b.get("ood_score") is not None:
                res["test_scores"].append(b["ood_score"])
        for f in ood:
            cat = os.path.basename(os.path.dirname(f))
            s, b = post(f, m)
            kind = "answered" if s == 200 else b["error_type"]
            res["ood"].setdefault(cat, collections.Counter())[kind] += 1
            score = b.get("ood_score") if s == 200 else (b.get("details") or {}).get("ood_score")
            if score is not None:
                res["ood_scores"].append(score)
            if s == 200:
                res["accepted_ood"].append(os.path.relpath(f, a.set))
        out[m] = res
        n_ood = sum(sum(c.values()) for c in res["ood"].values())
        refused = sum(sum(v for k, v in c.items() if k != "answered") for c in res["ood"].values())
        print(f"## {m}  (OOD threshold {thr})")
        print(f"test: {res['test']['answered']}/624 answered = {res['test']['answered'] / 624:.2%}; refusals {dict((k, v) for k, v in res['test'].items() if k != 'answered')}")
        print(f"out-of-distribution set: {refused}/{n_ood} refused = {refused / n_ood:.2%}")
        for cat, c in sorted(res["ood"].items()):
            t = sum(c.values())
            print(f"  {cat:10s} {t - c['answered']:3d}/{t:<3d} refused  {dict(sorted(c.items()))}")
        if res["test_scores"] and res["ood_scores"]:
            print(f"ood_score: test median {statistics.median(res['test_scores']):.2f} max {max(res['test_scores']):.2f}; "
                  f"OOD set (where scored) min {min(res['ood_scores']):.2f} median {statistics.median(res['ood_scores']):.2f}")
        if res["accepted_ood"]:
            print(f"answered from the OOD set: {res['accepted_ood']}")
        print()
    return out


if a.from_json:
    out = json.load(open(a.from_json))
else:
    out = measure()
SET = ("162 images from files shipped in PyPI packages (bench/ood_set.py): 102 photos (scikit-image, "
       "scikit-learn and matplotlib samples; colour, gray and gray crops; LFW faces), 24 documents and charts, "
       "16 other modalities and body parts rendered from their pixels (pydicom test files: CT, MR, NM bone scans, "
       "ultrasound, segmentation; matplotlib's MR brain; Shepp-Logan phantom; retina photos), 12 of those DICOM "
       "files as DICOM, 8 synthetic (blank, noise, gradient, checkerboard, a 4,000,000 x 1 strip)")
if a.write_cards:
    for m, res in out.items():
        n = sum(sum(c.values()) for c in res["ood"].values())
        refused = sum(sum(v for k, v in c.items() if k != "answered") for c in res["ood"].values())
        path = os.path.join(a.write_cards, f"{m}.json")
        text = open(path).read()
        # Text edit (the card's other numbers stay byte for byte): the `ood` entry is
        # the card's last; its measured fields are replaced or added at its end.
        head, sep, tail = text.rpartition('\n  "ood": {')
        assert sep, f"{path} has no ood entry: run cxr-train fit-ood first"
        body = tail[: tail.rindex("\n  }")]
        body = "\n".join(l for l in body.split("\n") if not l.strip().startswith(('"ood_set_refused"', '"ood_set"'))).rstrip(",")
        body += f',\n    "ood_set_refused": {json.dumps(refused / n)},\n    "ood_set": {json.dumps(SET)}'
        open(path, "w").write(head + sep + body + "\n  }\n}\n")
        json.loads(open(path).read())
        print(f"{path}: ood_set_refused {refused / n:.4f}")
if a.json:
    json.dump(out, open(a.json, "w"), indent=1, default=dict)
