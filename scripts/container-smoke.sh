#!/usr/bin/env bash
# Builds the repository's Dockerfile, unchanged, with podman and smoke-tests the image:
# runs it as its non-root user with a read-only root filesystem, waits for /ready,
# POSTs an X-ray to /predict, checks the answer, stops it (SIGTERM), starts it again
# on the same backend volume (the decision and OpenVINO's compiled models the first
# start left) and prints the image size, build time and both start-to-ready times
# (cold: measured; warm: read).
#
#   bash scripts/container-smoke.sh            # CPU image (the default target)
#
# These machines have no Docker engine and cannot pull base images, so the script
# (1) installs podman, buildah, runc and debootstrap from Debian if missing,
# (2) configures podman for this sandbox (runc, ulimits) through its own
#     containers.conf, and (3) makes the base images locally under the names the
#     Dockerfile uses: debootstrap a Debian rootfs and `podman import` it as
#     debian:<release>-slim, and the same plus this machine's Rust toolchain as
#     rust:<version>-slim-<release>. On a normal Docker host none of this is needed.
# Part of the test command (scripts/test.sh runs it with --ci): there it is skipped,
# saying so, only where podman cannot run at all (no root, no apt, no user
# namespaces); a Dockerfile that does not build or an image that does not answer
# fails. FRESH=1 remakes the base images.
set -euo pipefail
CI_MODE=0
PREPARE=0
for a in "$@"; do
  case "$a" in
    --ci) CI_MODE=1 ;;
    --prepare) PREPARE=1 ;;  # tools and base images only (test.sh runs it early, in the background)
    *) echo "usage: $0 [--ci] [--prepare]" >&2; exit 2 ;;
  esac
done
skip() { printf 'container smoke SKIPPED: %s\n' "$*"; exit 0; }
cd "$(dirname "$0")/.."
ROOT=$PWD
RELEASE=${RELEASE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
RUST_VERSION=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
IMAGE=${IMAGE:-localhost/cxr:smoke}
NAME=cxr-smoke-$$
PORT=${PORT:-18080}
WORK=${WORK:-/var/tmp/cxr-container}
mkdir -p "$WORK"
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# 1. Tools.
need=()
for t in podman buildah runc debootstrap curl; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  if ((CI_MODE)) && [ "$(id -u)" != 0 ]; then skip "not root: cannot install ${need[*]}"; fi
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
    ((CI_MODE)) && skip "apt cannot install ${need[*]}"
    fail "apt-get install ${need[*]}"
  fi
fi

# 2. podman configuration for this sandbox.
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
if ! podman info >/dev/null 2>"$WORK/podman-info.log"; then
  ((CI_MODE)) && skip "podman cannot run here: $(tail -1 "$WORK/podman-info.log")"
  fail "podman info: $(tail -3 "$WORK/podman-info.log")"
fi

# 3. Base images, made locally.
DEBIAN_IMAGE=docker.io/library/debian:$RELEASE-slim
RUST_IMAGE=docker.io/library/rust:$RUST_VERSION-slim-$RELEASE
rootfs() { # rootfs <dir> <extra packages>
  local dir=$1 include=$2
  rm -rf "$dir"
  debootstrap --variant=minbase ${include:+--include="$include"} --cache-dir="$WORK/debs" \
    "$RELEASE" "$dir" "$MIRROR" >"$dir.log" 2>&1 || { tail -20 "$dir.log"; fail "debootstrap $dir"; }
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin
  # This sandbox reaches the registries through a TLS-inspecting proxy: give the
  # base images this machine's extra CAs (a normal Docker host needs none of this).
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$dir/usr/local/share/ca-certificates" "$dir/etc/ssl/certs"
    cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  fi
}
mkdir -p "$WORK/debs"
if [ -n "${FRESH:-}" ]; then podman rmi -f "$DEBIAN_IMAGE" "$RUST_IMAGE" >/dev/null 2>&1 || true; fi
if ! podman image exists "$DEBIAN_IMAGE"; then
  say "making $DEBIAN_IMAGE (debootstrap $RELEASE)"
  rootfs "$WORK/debian" ""
  tar -C "$WORK/debian" -c . | podman import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$WORK/debian"
fi
if ! podman image exists "$RUST_IMAGE"; then
  say "making $RUST_IMAGE (debootstrap + this machine's Rust $RUST_VERSION)"
  rootfs "$WORK/rust" "gcc,libc6-dev,ca-certificates"
  sysroot=$(rustc --print sysroot)
  "$sysroot/bin/rustc" --version | grep -q "^rustc $RUST_VERSION " \
    || fail "this machine's toolchain is not $RUST_VERSION"
  mkdir -p "$WORK/rust/usr/local/rustup/toolchains" "$WORK/rust/usr/local/cargo/bin"
  cp -a "$sysroot" "$WORK/rust/usr/local/rustup/toolchains/"
  rm -rf "$WORK/rust/usr/local/rustup/toolchains/$(basename "$sysroot")/share/doc"
  for b in cargo rustc rustdoc; do
    ln -s "/usr/local/rustup/toolchains/$(basename "$sysroot")/bin/$b" "$WORK/rust/usr/local/cargo/bin/$b"
  done
  tar -C "$WORK/rust" -c . | podman import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' \
    - "$RUST_IMAGE" >/dev/null
  rm -rf "$WORK/rust"
fi

if ((PREPARE)); then say "tools and base images ready"; exit 0; fi

# 4. Build the real Dockerfile.
say "building $IMAGE from Dockerfile"
t0=$(date +%s)
podman build --network=host --format docker -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "podman build (log: $WORK/build.log)"; }
build_s=$(( $(date +%s) - t0 ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$(( size / 1000000 ))

# 5. What the image holds.
user=$(podman run --rm --entrypoint id "$IMAGE" -u)
[ "$user" != 0 ] || fail "the image runs as root"
if podman run --rm --entrypoint sh "$IMAGE" -c 'command -v cc gcc rustc cargo c++ ld' >/dev/null 2>&1; then
  fail "a compiler or linker is in the runtime image"
fi
# The limit: Debian slim, ONNX Runtime, OpenVINO's CPU libraries (89 MB, the second
# backend since issue 35) and the four shipped models (170 MB) fit in 520 MB.
[ "$size_mb" -lt 520 ] || fail "image is $size_mb MB (limit 520)"

# 6. Run it the way deploy/ does: non-root, read-only root, /tmp on tmpfs, the
#    backend decision and OpenVINO's compiled models on a volume (empty: cold).
STATE=$WORK/backend-state
rm -rf "$STATE" && mkdir -p "$STATE" && chmod 777 "$STATE"
cleanup() { podman rm -f "$NAME" "$NAME-warm" >/dev/null 2>&1 || true; }
trap cleanup EXIT
start() { # start <name>: runs the image on the backend volume; sets ready_s
  local name=$1 t0 ready=""
  say "starting $name on 127.0.0.1:$PORT"
  t0=$(date +%s.%N)
  podman run -d --name "$name" --read-only --tmpfs /tmp -v "$STATE:/var/lib/cxr/backend" \
    -p "127.0.0.1:$PORT:8080" "$IMAGE" >/dev/null
  for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then ready=1; break; fi
    podman container exists "$name" && [ "$(podman inspect --format '{{.State.Running}}' "$name")" = true ] \
      || { podman logs "$name" | tail -20; fail "the container exited"; }
    sleep 0.2
  done
  [ -n "$ready" ] || { podman logs "$name" | tail -20; fail "not ready within 120 s"; }
  ready_s=$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$t0")
}
start "$NAME"
cold_s=$ready_s

# 7. An X-ray: a test image of the data set when present, else a generated PNG.
xray=$(ls ../shared/data/chest_xray_224/test/PNEUMONIA/* 2>/dev/null | head -1 || true)
if [ -z "$xray" ]; then
  xray=$WORK/xray.png
  python3 - "$xray" <<'EOF'
import struct, sys, zlib
w = h = 256
rows = b"".join(b"\0" + bytes((x * y // 256 + x // 2) % 256 for x in range(w)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
EOF
fi
ct=image/png; case "$xray" in *.jpeg|*.jpg) ct=image/jpeg ;; esac
answer=$(curl -fsS -X POST --data-binary @"$xray" -H "Content-Type: $ct" "http://127.0.0.1:$PORT/predict")
echo "$answer" | python3 -c '
import json, sys
a = json.load(sys.stdin)
assert a["label"] in ("NORMAL", "PNEUMONIA"), a
assert abs(a["probabilities"]["NORMAL"] + a["probabilities"]["PNEUMONIA"] - 1) < 1e-4, a
assert a["model"]["name"] and len(a["model"]["sha256"]) == 64, a
assert a["execution_provider"] in ("CPUExecutionProvider", "OpenVINO:CPU"), a
# The image requires signed models: the answer names the signer it verified.
assert a["model"]["signed_by"]["signer"] == "cxr model release", a
print("   signed by:", a["model"]["signed_by"]["signer"], a["model"]["signed_by"]["key_id"][:16])
print("   answer:", a["label"], round(a["confidence"], 4), "from", a["model"]["name"], a["execution_provider"])
' || fail "unexpected /predict answer: $answer"
# The image's CXR_BACKEND=auto: OpenVINO's library loaded in the image, agreed with
# ONNX Runtime on the probe, and both were measured (whichever won), the decision
# written to the volume.
curl -fsS "http://127.0.0.1:$PORT/models" | python3 -c '
import json, sys
for m in json.load(sys.stdin)["models"]:
    why = m["live"].get("backend_choice") or ""
    d = m["live"].get("backend_decision") or {}
    assert why.startswith("measured"), (m["card"]["name"], why)
    assert d.get("source") == "measured" and d.get("written"), (m["card"]["name"], d)
    print("   backend:", m["card"]["name"], m["live"]["execution_provider"], "-", why)
' || fail "OpenVINO was not measured in the image, or its decision not written (CXR_BACKEND=auto)"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary 'junk' -H 'Content-Type: image/png' "http://127.0.0.1:$PORT/predict")
[ "$code" = 400 ] || fail "junk answered $code, not 400"
podman exec "$NAME" /usr/local/bin/cxr-serve --health-check || fail "HEALTHCHECK command fails"

# 8. Stop: SIGTERM, graceful drain, exit 0.
podman stop -t 20 "$NAME" >/dev/null
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$exit_code" = 0 ] || { podman logs "$NAME" | tail -20; fail "exit code $exit_code after SIGTERM"; }
podman logs "$NAME" 2>&1 | grep -q '"stopped' || podman logs "$NAME" 2>&1 | grep -q stopped \
  || fail "no clean-stop log line"

# 9. Again on the same volume: the decision read, OpenVINO's models from its cache
#    (each compiled model loaded from there, no entry compiled and written again:
#    the image once lacked the library OpenVINO reads its cache with, issue 45).
blobs() { (cd "$STATE/openvino-cache" && find . -name '*.blob' -printf '%p %s %T@\n' | sort); }
cold_blobs=$(blobs)
[ -n "$cold_blobs" ] || fail "the first start left no OpenVINO compiled models on the volume"
start "$NAME-warm"
warm_s=$ready_s
curl -fsS "http://127.0.0.1:$PORT/models" | python3 -c '
import json, sys
for m in json.load(sys.stdin)["models"]:
    d = m["live"].get("backend_decision") or {}
    assert d.get("source") == "read", (m["card"]["name"], d)
    if m["live"]["execution_provider"] == "OpenVINO:CPU":
        assert m["live"].get("openvino_from_cache") is True, (m["card"]["name"], m["live"])
    print("   backend:", m["card"]["name"], m["live"]["execution_provider"], "- read",
          "(compiled models from the cache)" if m["live"].get("openvino_from_cache") else "")
' || fail "the second start did not read the decision, or OpenVINO's compiled models, from the volume"
podman stop -t 20 "$NAME-warm" >/dev/null
[ "$(blobs)" = "$cold_blobs" ] \
  || fail "the second start compiled and wrote OpenVINO's cache again: $(blobs)"

say "PASS"
printf '| image | size | build (s) | start to ready, cold (s) | start to ready, warm (s) | user |\n|---|---|---|---|---|---|\n'
printf '| %s | %s MB | %s | %.1f | %.1f | %s |\n' "$IMAGE" "$size_mb" "$build_s" "$cold_s" "$warm_s" "$user"
