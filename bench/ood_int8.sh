#!/usr/bin/env bash
# Each INT8 copy's own out-of-distribution model and both its thresholds, fitted on its
# own embeddings exactly as the FP32 variants' were (issue 46):
#
#   1. `cxr-train fit-ood` on the INT8 card: the density model on the copy's embeddings
#      of the 4693 training images (training split less the validation patients), the
#      first threshold at 99 % of the validation images, clean and stressed together;
#      writes models/<name>.ood.json and the card's `ood` entry (file, sha256,
#      threshold, acceptances).
#   2. `cxr-train validate` through the serving core on the test split, the test split
#      under the stress perturbations (examples/stress_films.rs) and the OOD set
#      (bench/ood_set.py), with the new OOD model.
#   3. bench/ood_verdicts.py --write-cards: the second (refuse) threshold by the same
#      rule as the FP32 cards', and the OOD set's refusal share (gates + score).
#
#     bash bench/ood_int8.sh [weighted-int8 augmented-int8]
#
# CPU only; about 7,800 images through each INT8 model (about 10-40 min per model on
# 2 shared cores). Embeddings are cached in target/ood-cache by the ONNX file's hash,
# so a second run only refits. Debug builds are enough (the time is ONNX Runtime's).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(weighted-int8 augmented-int8)
data=${CXR_DATA:-../shared/data/chest_xray_224}
out=target/ood-int8
mkdir -p "$out"
cargo build --features train --bin cxr-train --example stress_films
train=./target/debug/cxr-train
cards=()
margs=()
for m in "${models[@]}"; do
  cards+=("models/$m.json")
  margs+=(--model "$m")
done
# 1. The density model and the first threshold.
"$train" fit-ood --data "$data" "${cards[@]}"
# 2. Every film's score through the serving core, with the new OOD models.
[ -d target/stressed-test ] || ./target/debug/examples/stress_films "$data/test" target/stressed-test
"$train" validate --films "$data/test" --labels folders --out "$out/test-report" \
  --site "Guangzhou test split (as a site)" "${margs[@]}"
"$train" validate --films target/stressed-test --labels folders --out "$out/stressed-report" \
  --site "the test split under the stress perturbations" "${margs[@]}"
venv=target/ood-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check scikit-image==0.26.0 scikit-learn==1.9.1 \
  matplotlib==3.11.2 pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.5.0 pillow==13.0.0
[ -d target/ood-set ] || "$venv/bin/python" bench/ood_set.py --out target/ood-set
"$train" validate --films target/ood-set --out "$out/oodset-report" --site ood-set "${margs[@]}"
# 3. The second threshold and the OOD set's refusal share, written to the cards.
python3 bench/ood_verdicts.py --radiographs "$out/test-report/site-report.json" \
  "$out/stressed-report/site-report.json" --ood-set "$out/oodset-report/site-report.json" \
  --write-cards models | tee "$out/verdicts.md"
