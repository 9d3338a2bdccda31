#!/usr/bin/env python3
"""Renders the measured metrics of models/*.json side by side into README.md,
between the <!-- models:begin --> and <!-- models:end --> markers (from the cards,
never retyped). `--check` exits 1 when README.md is out of date."""
import glob, json, os, sys

root = os.path.join(os.path.dirname(__file__), "..")
# Cards are `<name>.json` with no further dot (not `<name>.ood.json`, `.test-scores.json`).
cards = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(root, "models", "*.json")))
         if "." not in os.path.basename(p)[:-len(".json")]]
rows = [("variant", lambda c: f"`{c['name']}` {c['version']}"),
        ("strategy", lambda c: c["training"]["strategy"]),
        ("precision", lambda c: c.get("precision", "fp32")),
        ("input", lambda c: f"{c['input_size']} px"),
        ("epochs (sizes)", lambda c: f"{c['training']['epochs']} ({', '.join(map(str, c['training']['image_sizes']))} px)"),
        ("threshold (chosen on validation)", lambda c: f"{c['threshold']:.3f}")]
def val(c, k):
    m = c["metrics"].get(k)
    return "—" if not m else f"{100 * m['sensitivity']:.1f} % / {100 * m['specificity']:.1f} % / {m['auc']:.3f}"
def wall(s):
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"
metric = lambda k, pct=True: (lambda c: "—" if not c["metrics"].get("test") else (f"{100 * c['metrics']['test'][k]:.1f} %" if pct else f"{c['metrics']['test'][k]:.3f}"))
rows += [("test accuracy", metric("accuracy")), ("test sensitivity", metric("sensitivity")),
         ("test specificity", metric("specificity")), ("test precision", metric("precision")),
         ("test F1", metric("f1", False)), ("test AUC", metric("auc", False)), ("test ECE", metric("ece", False)),
         ("test confusion (TP FP TN FN)", lambda c: " ".join(str(c["metrics"]["test"]["confusion"][k]) for k in ("tp", "fp", "tn", "fn")) if c["metrics"].get("test") else "—"),
         ("test ECE before calibration", lambda c: f"{c['calibration']['test_ece_before']:.3f}" if c.get("calibration") else "—"),
         ("temperature (fitted on validation)", lambda c: f"{c['calibration']['temperature']:.3f}" if c.get("calibration") else "—"),
         ("validation sens / spec / AUC", lambda c: val(c, "validation")),
         ("stressed validation sens / spec / AUC", lambda c: val(c, "validation_stressed")),
         ("INT8: test labels equal to FP32's", lambda c: f"{100 * c['quantization']['test_label_agreement']:.2f} % (max Δp {c['quantization']['test_max_abs_probability_diff']:.3f})" if c.get("quantization") else "—"),
         ("OOD: test answered / OOD set refused", lambda c: (f"{100 * c['ood']['test_acceptance']:.1f} %" if c.get("ood", {}).get("test_acceptance") is not None else "—") + " / " + (f"{100 * c['ood']['ood_set_refused']:.1f} %" if c.get("ood", {}).get("ood_set_refused") is not None else "—")),
         ("ONNX file", lambda c: f"{c['onnx']['bytes'] / 1e6:.1f} MB ({'int8 conv/classifier weights' if c.get('precision') == 'int8' else c['onnx']['weight_storage']})"),
         ("training wall time", lambda c: wall(c["training"]["wall_time_s"]) + f" on {c['training']['device']}")]
if cards:
    table = "| | " + " | ".join(f"**{c['name']}**" for c in cards) + " |\n|---|" + "---|" * len(cards) + "\n"
    table += "".join(f"| {name} | " + " | ".join(str(f(c)) for c in cards) + " |\n" for name, f in rows)
    table += f"\nTest split: n = {cards[0]['metrics']['test']['n'] if cards[0]['metrics'].get('test') else '—'} images (Kermany et al.).\n"
else:
    table = "No model in `models/` yet.\n"
path = os.path.join(root, "README.md")
text = open(path).read()
b, e = "<!-- models:begin -->\n", "<!-- models:end -->"
new = text[: text.index(b) + len(b)] + table + text[text.index(e):]
if "--check" in sys.argv:
    sys.exit(0 if new == text else 1)
open(path, "w").write(new)
