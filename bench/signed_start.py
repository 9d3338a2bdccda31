"""What verifying the model signatures costs at start (issue 47): seconds from
starting cxr-serve to its first `/ready` 200 over the shipped models, `--backend ort`,
with and without verification, alternating, `--runs` rounds; and `cxr-sign
--verify-with` alone (the signatures and every file re-hashed, no session made).

- `unverified`: no `--trusted-signers` (each version loads with a warning);
- `verified`: `--require-signed-models --trusted-signers deploy/signing/trusted-signers.toml`.

    cargo build --bin cxr-serve --bin cxr-sign
    .venv/bin/python bench/signed_start.py [--runs 3]
"""
import argparse, json, os, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402
from start_to_ready import wait_ready  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SIGNERS = os.path.join(ROOT, "deploy/signing/trusted-signers.toml")


def start(a, verified, verify_ms):
    port = serving.free_port()
    cmd = [a.binary, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--backend", "ort", "--log-format", "json", "--models-dir", a.models_dir]
    if verified:
        cmd += ["--require-signed-models", "--trusted-signers", SIGNERS]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.DEVNULL)
        s = wait_ready(port, lambda: p.poll() is None, t0)
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        log.seek(0)
        # The server's own measure: each version's signature check (bundle, statement,
        # files not already hashed by the registry), summed over the versions.
        ms = [json.loads(l)["fields"].get("verify_ms") for l in log if '"signature verified"' in l]
        if verified:
            verify_ms.append(sum(m for m in ms if m is not None))
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/debug/cxr-serve"))
    ap.add_argument("--signer", default=os.path.join(ROOT, "target/debug/cxr-sign"))
    ap.add_argument("--models-dir", default=os.path.join(ROOT, "models"))
    a = ap.parse_args()
    times = {"unverified": [], "verified": [], "cxr-sign --verify-with": []}
    verify_ms = []
    for _ in range(a.runs):
        times["unverified"].append(start(a, False, verify_ms))
        times["verified"].append(start(a, True, verify_ms))
        t0 = time.time()
        subprocess.run([a.signer, "--verify-with", SIGNERS, "--models-dir", a.models_dir],
                       check=True, stdout=subprocess.DEVNULL)
        times["cxr-sign --verify-with"].append(time.time() - t0)
    print("| start to ready | " + " | ".join(f"run {i + 1}" for i in range(a.runs)) + " | median |")
    print("|---|" + "---|" * (a.runs + 1))
    for k, v in times.items():
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + f" | **{statistics.median(v):.2f} s** |")
    print("| in the server: signature checks, all versions (ms) | "
          + " | ".join(f"{x:.1f}" for x in verify_ms) + f" | **{statistics.median(verify_ms):.1f} ms** |")


if __name__ == "__main__":
    main()
