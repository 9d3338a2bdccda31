#!/usr/bin/env bash
# Training-step speed, DenseNet-161: cxr-train's tch step vs the same step in
# PyTorch (bench/train_step.py), same batch, same threads, measured in one run.
#   bash bench/train_speed.sh [STEPS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}; threads=${2:-2}
bash scripts/setup.sh --train >/dev/null
source scripts/env.sh
cargo build --release --features train --bench train_step >/dev/null 2>&1
bin=$(ls -t target/release/deps/train_step-* | grep -v '\.d$' | head -n1)
echo "| image size | batch | threads | PyTorch img/s | cxr-train (tch) img/s | tch / PyTorch |"
echo "|---|---|---|---|---|---|"
for cfg in "112 32" "224 16"; do
  set -- $cfg
  py=$(.venv/bin/python bench/train_step.py "$1" "$2" "$steps" "$threads")
  rs=$("$bin" "$1" "$2" "$steps" "$threads")
  echo "| $1 | $2 | $threads | $py | $rs | $(python3 -c "print(f'{$rs/$py:.2f}')") |"
done
