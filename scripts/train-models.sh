#!/usr/bin/env bash
# The 1.0.0 recipe on this CPU (7 epochs at 112 px + 1 at 224 px). The shipped 2.0.0
# models were trained on a GPU by scripts/gpu/train_v2.py and exported and measured
# by `cxr-train --import-weights` (README, "On a GPU"); a fresh clone finds them final
# in models/ and trains nothing here unless FORCE=1.
#
# Trains (or resumes) the two shipped variants on the Kermany data and copies each
# finished model, card and plots into models/. Safe to stop and re-run: every run
# resumes from its last checkpoint in runs/<name>/.
#
#   nohup bash scripts/train-models.sh > runs/train.log 2>&1 &
#
# DATA defaults to ../shared/data/chest_xray_224. Extra arguments go to cxr-train.
# INTERIM=1 instead exports each run's latest checkpoint (measured like a final
# model, marked interim in its card) and ships that, while training goes on; an
# interim model ships with its training state (models/<name>.state), so a machine
# without runs/ (a fresh checkout) continues from it instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/chest_xray_224}
bash scripts/setup.sh --train
source scripts/env.sh
cargo build --locked --release --features train --bin cxr-train
mkdir -p runs models/plots
# One recipe for both variants (same seed, split and schedule), so the comparison is
# fair: 7 epochs at 112 px, then one fine-tuning epoch at 224 px (progressive
# resizing; about 18 min per 112-px epoch and 72 min per 224-px epoch on 2 cores).
RECIPE=(--epochs 8 --image-size 112 --final-image-size 224 --final-epochs 1
        --batch-size 32 --final-batch-size 16 --optimizer adamw --lr 2e-3 --weight-decay 0.05
        --schedule onecycle --label-smoothing 0.1 --val-fraction 0.1 --seed 42
        --threshold youden --storage fp16 --checkpoint-every 25)
for strategy in ${STRATEGIES:-weighted augmented}; do
  out=runs/$strategy
  if [ -n "${INTERIM:-}" ]; then
    [ -f "$out/checkpoint.safetensors" ] || { echo "== $strategy: no checkpoint yet"; continue; }
    ./target/release/cxr-train --data "$DATA" --out "$out" --strategy "$strategy" --resume --export-only "${RECIPE[@]}" "$@"
    cp "$out/interim/$strategy.onnx" "$out/interim/$strategy.json" "$out/interim/$strategy.state" models/
    for p in curves roc confusion; do cp "$out/interim/$p.png" "models/plots/$strategy-$p.png"; done
    cp "$out/history.csv" "models/plots/$strategy-history.csv"
    continue
  fi
  if [ -f "$out/$strategy.json" ] && [ -f "$out/$strategy.onnx" ] && [ -z "${FORCE:-}" ]; then
    echo "== $strategy already finished"
  elif [ -f "models/$strategy.json" ] && [ ! -f "models/$strategy.state" ] && [ -z "${FORCE:-}" ]; then
    # A final model (an interim one ships with its .state) from an earlier machine.
    echo "== $strategy: final model already in models/ (FORCE=1 trains it again)"
    continue
  else
    echo "== training $strategy ($(date -u))"
    # No checkpoint in runs/ (a fresh machine): continue from the shipped interim.
    from=()
    [ -f "models/$strategy.state" ] && from=(--resume-from "models/$strategy.onnx")
    ./target/release/cxr-train --data "$DATA" --out "$out" --strategy "$strategy" --resume "${from[@]}" "${RECIPE[@]}" "$@"
    if [ ! -f "$out/$strategy.onnx" ]; then
      echo "== $strategy stopped before its last epoch (--stop-after-steps); run again to continue"
      exit 0
    fi
  fi
  cp "$out/$strategy.onnx" "$out/$strategy.json" models/
  rm -f "models/$strategy.state"
  for p in curves roc confusion; do cp "$out/$p.png" "models/plots/$strategy-$p.png"; done
  cp "$out/history.csv" "models/plots/$strategy-history.csv"
done
echo "== done ($(date -u))"
