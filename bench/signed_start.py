"""What verifying the model signatures costs at start (issue 47): seconds from
starting cxr-serve to its first `/ready` 200 over the shipped models, `--backend ort`,
with and without verification, alternating, `--runs` rounds; and `cxr-sign
--verify-with` alone (the signatures and every file re-hashed, no session made).

- `unverified`: no `--trusted-signers` (each version loads with a warning);
- `verified`: `--require-signed-models --trusted-signers deploy/signing/trusted-signers.toml`.

    cargo build --bin cxr-serve --bin cxr-sign
    .venv/bin/python bench/signed_start.py [--runs 3]
"""
import argparse, os, signal, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402
from start_to_ready import wait_ready  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SIGNERS = os.path.join(ROOT, "deploy/signing/trusted-signers.toml")


def start(a, verified):
    port = serving.free_port()
    cmd = [a.binary, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--backend", "ort", "--models-dir", a.models_dir]
    if verified:
        cmd += ["--require-signed-models", "--trusted-signers", SIGNERS]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = wait_ready(port, lambda: p.poll() is None, t0)
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/debug/cxr-serve"))
    ap.add_argument("--signer", default=os.path.join(ROOT, "target/debug/cxr-sign"))
    ap.add_argument("--models-dir", default=os.path.join(ROOT, "models"))
    a = ap.parse_args()
    times = {"unverified": [], "verified": [], "cxr-sign --verify-with": []}
    for _ in range(a.runs):
        times["unverified"].append(start(a, False))
        times["verified"].append(start(a, True))
        t0 = time.time()
        subprocess.run([a.signer, "--verify-with", SIGNERS, "--models-dir", a.models_dir],
                       check=True, stdout=subprocess.DEVNULL)
        times["cxr-sign --verify-with"].append(time.time() - t0)
    print("| start to ready | " + " | ".join(f"run {i + 1}" for i in range(a.runs)) + " | median |")
    print("|---|" + "---|" * (a.runs + 1))
    for k, v in times.items():
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + f" | **{statistics.median(v):.2f} s** |")


if __name__ == "__main__":
    main()
