#!/usr/bin/env bash
# The out-of-distribution measurement behind bench/RESULTS.md and the cards' `ood`
# entries: assembles the OOD set (bench/ood_set.py, from files shipped inside PyPI
# packages), starts a release cxr-serve on models/ (default --ood-action refuse) and
# runs bench/ood.py against it. ~10 min on 2 cores.
#
#     bash bench/ood.sh [--json target/ood-results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
venv=target/ood-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check scikit-image==0.26.0 scikit-learn==1.9.1 \
  matplotlib==3.11.2 pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.5.0 pillow==13.0.0
"$venv/bin/python" bench/ood_set.py --out target/ood-set
cargo build --release --bin cxr-serve
port=18095
./target/release/cxr-serve --models-dir models --host 127.0.0.1 --port "$port" > target/ood-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break
  sleep 1
done
python3 bench/ood.py --url "http://127.0.0.1:$port" --set target/ood-set "$@"
# With --write-cards models, each card's ood entry records its OOD-set refusal share.
