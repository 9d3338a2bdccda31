#!/usr/bin/env python3
"""Fits the OOD score's second threshold (the card's `ood.refuse_threshold`): two
verdicts instead of one. Below the card's `ood.threshold` (99 % of clean + stressed
validation) an image is in distribution; above `refuse_threshold` it is not a chest
radiograph the model can answer for (refused); in between, a radiograph unlike the
training films (answered, with `in_distribution: false` and a `distribution_shift`
warning).

Inputs are `cxr-train validate` reports (every film's OOD score, through the serving
core): radiographs (the test split, and the test split under the stress
perturbations: `cargo run --release --example stress_films`), and the OOD set
(`bench/ood_set.py`: photos, documents, other modalities, synthetic images).

The rule, per model: O+ = the OOD-set images the single threshold refuses by their
score. The second threshold must answer none of them, so it lies below min(O+); it
is put halfway between the highest radiograph score and min(O+) when the radiographs
all score below min(O+), else just below min(O+); never below the first threshold.
The OOD-set images the first threshold already answers (in distribution) stay
answered as before: the second threshold changes nothing below the first.

    python3 bench/ood_verdicts.py --radiographs docs/site-example/site-report.json \\
        target/stressed-report/site-report.json --ood-set target/oodset-report/site-report.json \\
        [--write-cards models]

With --write-cards each card's `ood` entry gets `refuse_threshold`, `refuse_rule` and
`ood_set_refused` (the OOD set's share not answered: input gates and score together,
as bench/ood.py measures it against the server); an INT8 copy's card that has no
`ood_set` description takes its FP32 source's. bench/ood_int8.sh runs the whole fit
for the INT8 copies.
"""
import argparse, json, os


def scores(report, model):
    for m in report["models"]:
        if m["name"] == model:
            return [f["ood_score"] for f in m["films"] if f.get("ood_score") is not None], m
    return None, None


def share(xs, pred):
    return sum(1 for x in xs if pred(x)) / len(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--radiographs", nargs="+", required=True)
    ap.add_argument("--ood-set", required=True)
    ap.add_argument("--write-cards")
    a = ap.parse_args()
    rad_reports = [(p, json.load(open(p))) for p in a.radiographs]
    ood_report = json.load(open(a.ood_set))
    print("| model | first threshold | second threshold | radiographs in / shift / refused | OOD set refused (score) before → after | OOD set refused in all (gates + score) |")
    print("|---|---|---|---|---|---|")
    for m in ood_report["models"]:
        name = m["name"]
        inner = m["ood"]["card_threshold"]
        o, om = scores(ood_report, name)
        gated = sum(om["refused"].values())
        r = []
        names = []
        for p, rep in rad_reports:
            s, _ = scores(rep, name)
            if s:
                r += s
                names.append(f"{rep['site']} ({len(s)})")
        o_plus = [x for x in o if x > inner]
        top_r = max(r)
        if o_plus and top_r < min(o_plus):
            outer = (top_r + min(o_plus)) / 2
            how = f"halfway between the highest radiograph score {top_r:.3f} and the lowest score {min(o_plus):.3f} of an OOD-set image the first threshold refuses"
        elif o_plus:
            outer = min(o_plus) * (1 - 1e-6)
            how = f"just below {min(o_plus):.3f}, the lowest score of an OOD-set image the first threshold refuses (the highest radiograph score, {top_r:.3f}, is above it: those radiographs stay refused)"
        else:
            outer = inner
            how = "no OOD-set image above the first threshold: the second equals it"
        outer = max(outer, inner)
        r_in = share(r, lambda x: x <= inner)
        r_shift = share(r, lambda x: inner < x <= outer)
        r_out = share(r, lambda x: x > outer)
        before = sum(1 for x in o if x > inner)
        after = sum(1 for x in o if x > outer)
        total = len(o) + gated
        rule = (
            f"{how}; radiographs ({' + '.join(names)}): {r_in:.1%} in distribution, {r_shift:.1%} answered as a distribution shift, "
            f"{r_out:.1%} refused; OOD set ({total} images, bench/ood_set.py): {gated} refused by the input gates, "
            f"{after} of the {len(o)} scored refused by the score ({before} at the first threshold alone), "
            f"{len(o) - before} answered as in distribution (as with one threshold). Chosen on these sets (in-sample)."
        )
        print(f"| {name} | {inner:.3f} | {outer:.3f} | {r_in:.1%} / {r_shift:.1%} / {r_out:.1%} | {before} → {after} of {len(o)} | {(gated + after) / total:.1%} of {total} |")
        print(f"  {name}: {rule}")
        if a.write_cards:
            path = os.path.join(a.write_cards, name + ".json")
            card = json.load(open(path))
            card["ood"]["refuse_threshold"] = outer
            card["ood"]["refuse_rule"] = rule
            # What bench/ood.py measures against the served model (--ood-action
            # refuse): the share of the OOD set not answered, gates and score together.
            card["ood"]["ood_set_refused"] = (gated + after) / total
            if "ood_set" not in card["ood"]:
                # An INT8 copy: the set is its FP32 source's (bench/ood_set.py).
                src = (card.get("quantization") or {}).get("source_model")
                src_card = os.path.join(a.write_cards, f"{src}.json") if src else None
                if src_card and os.path.exists(src_card):
                    desc = json.load(open(src_card)).get("ood", {}).get("ood_set")
                    if desc:
                        card["ood"]["ood_set"] = desc
            with open(path, "w") as f:
                json.dump(card, f, indent=2, ensure_ascii=False)
                f.write("\n")


if __name__ == "__main__":
    main()
