#!/usr/bin/env python3
"""What every served variant says of one film: label, confidence, OOD score, the
variant's two OOD thresholds and its verdict (in distribution / distribution shift /
refused), as a Markdown table; the story the page tells in one sentence when they
disagree. Standard library only.

    python3 bench/film_story.py --url http://127.0.0.1:8080 FILE [FILE...]

Used for issue 46's adult PA chest CR (pydicom-data's RG1_UNCR.dcm and RG1_J2KR.dcm:
`pip download --no-deps pydicom-data==1.0.0`, then unzip data_store/data/RG1_*.dcm).
"""
import argparse, json, os, urllib.error, urllib.request


def call(url, path, body=None, ctype=None):
    req = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    _, models = call(a.url, "/models")
    cards = {m["card"]["name"]: m["card"] for m in models["models"]}
    for f in a.files:
        body = open(f, "rb").read()
        ctype = "application/dicom" if f.lower().endswith((".dcm", ".dicom")) else "image/png" if f.lower().endswith(".png") else "image/jpeg"
        print(f"\n{os.path.basename(f)}\n")
        print("| variant | label | confidence | OOD score | OOD thresholds (warn / refuse) | verdict |")
        print("|---|---|---|---|---|---|")
        for name, card in cards.items():
            status, v = call(a.url, f"/predict?model={name}", body, ctype)
            ood = card.get("ood") or {}
            thr = f"{ood.get('threshold', float('nan')):.3f} / {ood.get('refuse_threshold', ood.get('threshold', float('nan'))):.3f}"
            if status == 200:
                shift = any(w.startswith("distribution_shift") for w in v.get("warnings", []))
                verdict = "in distribution" if v.get("in_distribution") else "distribution shift (answered, warned)" if shift else "not checked" if v.get("in_distribution") is None else "out of distribution (answered)"
                score = v.get("ood_score")
                print(f"| {name} | {v['label']} | {100 * v['confidence']:.1f} % | {score:.3f} | {thr} | {verdict} |")
            else:
                score = (v.get("details") or {}).get("ood_score")
                s = f"{score:.3f}" if isinstance(score, (int, float)) else "—"
                print(f"| {name} | — | — | {s} | {thr} | refused: {v.get('error_type')} (HTTP {status}) |")


if __name__ == "__main__":
    main()
