#!/usr/bin/env bash
# Installs everything cxr needs on a fresh Debian machine, into project-local,
# git-ignored folders. Idempotent: re-running only checks.
#
#   bash scripts/setup.sh           ONNX Runtime (CPU) for cxr-serve and the tests
#   bash scripts/setup.sh --train   + libtorch (PyPI torch wheel) for cxr-train
#   bash scripts/setup.sh --gpu     ONNX Runtime with CUDA 13 (onnxruntime-gpu[cuda,cudnn])
#   bash scripts/setup.sh --test    + the independent tools the tests check against:
#                                   tritonclient[http,grpc] (NVIDIA's V2 protocol client),
#                                   pydicom, Pillow, dciodvfy (Debian's dicom3tools), and
#                                   for the page's browser test Debian's chromium, Node
#                                   and puppeteer-core (npm; it downloads no browser),
#                                   nginx (a real gateway in front of two replicas),
#                                   a real FHIR R4 server (npm @medplum/fhir-router in
#                                   tests/fhir_server) and fhir.resources (R4 models, in
#                                   their own venv tests/fhir_server/.venv: pydantic 1),
#                                   hl7 (python-hl7's MLLP server) and hl7apy (HL7 v2
#                                   validation) for the RIS delivery tests,
#                                   cargo-deny and cargo-cyclonedx (crates.io, compiled:
#                                   minutes; skipped when the pinned version is there)
#
# Nothing is downloaded at build or run time: ONNX Runtime and libtorch come from
# their official PyPI wheels, installed here with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.32.0
# tch 0.26 is built against exactly this libtorch.
TORCH_VERSION=2.13.0
TRITONCLIENT_VERSION=2.73.0
PYDICOM_VERSION=3.0.1
OPENVINO_VERSION=2026.4.1
GRPCIO_REFLECTION_VERSION=1.81.1
PILLOW_VERSION=12.0.0
OTEL_PROTO_VERSION=1.45.2
PYNETDICOM_VERSION=3.0.4
# The last fhir.resources whose models are FHIR R4 (4.0.1); later ones are R5 and R4B.
# It needs pydantic 1, so it has a venv of its own (the main one has pydantic 2).
FHIR_RESOURCES_VERSION=6.1.0
FHIR_PYDANTIC_VERSION=1.10.21
HL7_VERSION=0.4.5
HL7APY_VERSION=1.3.5
# OpenSSF Model Signing (tests/signing.rs: interop both ways); its certificate module
# imports pyOpenSSL, which 1.1.1 does not declare.
MODEL_SIGNING_VERSION=1.1.1
PYOPENSSL_VERSION=26.4.0
# The supply chain's checks (scripts/test.sh, scripts/supply-chain.sh): cargo-deny's
# license/bans/sources policy (deny.toml) and cargo-cyclonedx's SBOM; both build with
# rust-toolchain.toml's 1.95.
CARGO_DENY_VERSION=0.18.3
CARGO_CYCLONEDX_VERSION=0.5.7

train=0; gpu=0; tests=0
for a in "$@"; do
  case "$a" in
    --train) train=1 ;;
    --gpu) gpu=1 ;;
    --test) tests=1 ;;
    *) echo "usage: $0 [--train] [--gpu] [--test]" >&2; exit 2 ;;
  esac
done

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v cc >/dev/null || need_apt+=(build-essential)
((tests)) && ! command -v dciodvfy >/dev/null && need_apt+=(dicom3tools)
((tests)) && ! command -v chromium >/dev/null && need_apt+=(chromium)
# A plain reverse proxy in front of two replicas (tests/gateway.rs).
((tests)) && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && need_apt+=(nginx-light)
# The DICOM node's tests: a real PACS (Orthanc, with its DICOMweb plugin for STOW-RS)
# and dcmtk's echoscu/storescu as the modality (tests/dicom_node.rs).
((tests)) && ! command -v storescu >/dev/null && need_apt+=(dcmtk)
((tests)) && ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ] && need_apt+=(orthanc)
# tests/signing.rs: keys made by an independent tool (and scripts/sign-models.sh).
((tests)) && ! command -v openssl >/dev/null && need_apt+=(openssl)
((tests)) && ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 && need_apt+=(orthanc-dicomweb)
# The outbox shared by replicas (--database-url) is tested against a real server.
((tests)) && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && need_apt+=(postgresql)
((tests)) && ! command -v node >/dev/null && need_apt+=(nodejs)
((tests)) && ! command -v npm >/dev/null && need_apt+=(npm)
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }

if ((gpu)); then ort_pkg=onnxruntime-gpu; other=onnxruntime; else ort_pkg=onnxruntime; other=onnxruntime-gpu; fi
have=$(.venv/bin/python -m pip show "$ort_pkg" 2>/dev/null | awk '/^Version:/{print $2}' || true)
if [ "$have" != "$ORT_VERSION" ]; then
  echo "setup: installing $ort_pkg==$ORT_VERSION"
  .venv/bin/python -m pip show "$other" >/dev/null 2>&1 && pip uninstall -y "$other"
  if ((gpu)); then pip install "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"; else pip install "onnxruntime==$ORT_VERSION"; fi
fi
capi=$(.venv/bin/python - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("onnxruntime")
print(os.path.join(os.path.dirname(spec.origin), "capi"))
PY
)
lib=$(ls "$capi"/libonnxruntime.so.* | head -n1)
mkdir -p .ort
ln -sfn "$capi" .ort/lib
ln -sfn "$(basename "$lib")" "$capi/libonnxruntime.so"
echo "setup: ONNX Runtime $ORT_VERSION at .ort/lib/libonnxruntime.so -> $lib"

# OpenVINO, the second CPU backend (--backend openvino|auto): its C library from the
# PyPI wheel, linked at .openvino/lib/libopenvino_c.so (loaded at run time).
have=$(.venv/bin/python -m pip show openvino 2>/dev/null | awk '/^Version:/{print $2}' || true)
if [ "$have" != "$OPENVINO_VERSION" ]; then
  echo "setup: installing openvino==$OPENVINO_VERSION (the OpenVINO backend's library)"
  pip install "openvino==$OPENVINO_VERSION"
fi
ovlibs=$(.venv/bin/python -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "libs"))')
ovc=$(ls "$ovlibs"/libopenvino_c.so.* | head -1)
mkdir -p .openvino
ln -sfn "$ovlibs" .openvino/lib
ln -sfn "$(basename "$ovc")" "$ovlibs/libopenvino_c.so"
echo "setup: OpenVINO $OPENVINO_VERSION at .openvino/lib/libopenvino_c.so -> $ovc"

if ((train)); then
  have=$(.venv/bin/python -m pip show torch 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION (libtorch for cxr-train; ~4.6 GB with its CUDA libraries)"
    pip install "torch==$TORCH_VERSION"
  fi
  echo "setup: libtorch from torch $TORCH_VERSION in .venv (build with: source scripts/env.sh)"
fi

if ((tests)); then
  have=$(.venv/bin/python -m pip show tritonclient 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$TRITONCLIENT_VERSION" ] || ! .venv/bin/python -c 'import tritonclient.grpc, grpc_reflection' 2>/dev/null; then
    echo "setup: installing tritonclient[http,grpc]==$TRITONCLIENT_VERSION and grpcio-reflection (V2 protocol interoperability tests, REST and gRPC)"
    pip install "tritonclient[http,grpc]==$TRITONCLIENT_VERSION" "grpcio-reflection==$GRPCIO_REFLECTION_VERSION"
  fi
  have=$(.venv/bin/python -m pip show pydicom 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$PYDICOM_VERSION" ]; then
    echo "setup: installing pydicom==$PYDICOM_VERSION (reads back the DICOM SRs in the tests)"
    pip install "pydicom==$PYDICOM_VERSION"
  fi
  have=$(.venv/bin/python -m pip show pillow 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$PILLOW_VERSION" ]; then
    echo "setup: installing pillow==$PILLOW_VERSION (makes the resize fixture; bench/abuse.py)"
    pip install "pillow==$PILLOW_VERSION"
  fi
  have=$(.venv/bin/python -m pip show opentelemetry-proto 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$OTEL_PROTO_VERSION" ]; then
    echo "setup: installing opentelemetry-proto==$OTEL_PROTO_VERSION (a real OTLP receiver for the tracing test)"
    pip install "opentelemetry-proto==$OTEL_PROTO_VERSION"
  fi
  have=$(.venv/bin/python -m pip show pynetdicom 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$PYNETDICOM_VERSION" ]; then
    echo "setup: installing pynetdicom==$PYNETDICOM_VERSION (a destination that refuses objects, tests/dicom_node; bench/soak.py)"
    pip install "pynetdicom==$PYNETDICOM_VERSION"
  fi
  have=$(.venv/bin/python -m pip show hl7 2>/dev/null | awk '/^Version:/{print $2}' || true)
  have_apy=$(.venv/bin/python -m pip show hl7apy 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$HL7_VERSION" ] || [ "$have_apy" != "$HL7APY_VERSION" ]; then
    echo "setup: installing hl7==$HL7_VERSION and hl7apy==$HL7APY_VERSION (a real MLLP listener and a v2.5.1 validator, tests/hl7)"
    pip install "hl7==$HL7_VERSION" "hl7apy==$HL7APY_VERSION"
  fi
  have=$(.venv/bin/python -m pip show model-signing 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$MODEL_SIGNING_VERSION" ]; then
    echo "setup: installing model-signing==$MODEL_SIGNING_VERSION (OMS bundles verified both ways, tests/signing.rs)"
    pip install "model-signing==$MODEL_SIGNING_VERSION" "pyopenssl==$PYOPENSSL_VERSION"
  fi
  # puppeteer-core drives the system chromium (tests/ui.rs); it never downloads one.
  if [ ! -d tests/ui/node_modules/puppeteer-core ] || [ tests/ui/package-lock.json -nt tests/ui/node_modules ]; then
    echo "setup: installing puppeteer-core (npm ci in tests/ui; the page's browser test)"
    (cd tests/ui && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
  fi
  # A real FHIR R4 server for the FHIR sender's tests (tests/fhir.rs): Medplum's
  # router over its in-memory repository, no database, no network at run time.
  if [ ! -d tests/fhir_server/node_modules/@medplum/fhir-router ] || [ tests/fhir_server/package-lock.json -nt tests/fhir_server/node_modules ]; then
    echo "setup: installing @medplum/fhir-router (npm ci in tests/fhir_server; the FHIR server of the tests)"
    (cd tests/fhir_server && npm ci --no-audit --no-fund --loglevel=error)
  fi
  # cargo install --list names each tool with its version: reinstalled only when the
  # pin changes.
  for tool in "cargo-deny $CARGO_DENY_VERSION" "cargo-cyclonedx $CARGO_CYCLONEDX_VERSION"; do
    set -- $tool
    if ! cargo install --list | grep -qx "$1 v$2:"; then
      echo "setup: installing $1@$2 (crates.io; the supply chain's checks, scripts/test.sh)"
      cargo install --locked "$1@$2"
    fi
  done
  set --
  fv=tests/fhir_server/.venv
  [ -x $fv/bin/python ] || python3 -m venv $fv
  have=$($fv/bin/python -m pip show fhir.resources 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ "$have" != "$FHIR_RESOURCES_VERSION" ]; then
    echo "setup: installing fhir.resources==$FHIR_RESOURCES_VERSION (FHIR R4 models, validating what the FHIR server stored)"
    $fv/bin/python -m pip -q --disable-pip-version-check install "fhir.resources==$FHIR_RESOURCES_VERSION" "pydantic==$FHIR_PYDANTIC_VERSION"
  fi
fi
