#!/usr/bin/env python3
"""Abuse and soak checks of a running cxr-serve (issue 14). Not a test: it prints
measurements for bench/RESULTS.md. Traffic goes to 127.0.0.1 only; every loop is
bounded in count and time.

    .venv/bin/python bench/abuse.py --port 8090 --pid <server pid> [--only a,b,c,d,e] [--mutations 10000]

(a) 100 concurrent 32 MiB uploads that hold back their last byte: the server's RSS,
    how fast the ones beyond --max-buffered-bytes are refused, and a normal JPEG sent
    meanwhile. (b) 256 clients dripping a body at 1 byte/s plus one normal client.
    (c) mutated uploads (truncations, bit flips, header edits of real JPEG, PNG and
    DICOM files): status counts, 5xx, whether the process lives, RSS before/after.
(d) the V2 flood (issue 29): concurrent ~29 MiB `/v2/models/<m>/infer` bodies whose
    FP32 `data` holds 15,000,000 zeros for a [1,3,224,224] shape, and binary bodies of
    7,000,000 zero-length BYTES elements for a [1] shape: status and time of each,
    and the server's peak RSS (VmHWM) growth. (e) idle h2c: --max-connections
    connections that send the HTTP/2 preface and an empty SETTINGS frame, then
    nothing: when each is closed, and whether /health answers during and after.
"""
import argparse, glob, os, random, socket, struct, sys, threading, time

HOST = "127.0.0.1"


def rss_mb(pid, field="VmRSS"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port, body, ct="image/jpeg", path="/predict", timeout=60, headers=None):
    """One POST on its own connection; the status, or 0 when none came back."""
    headers = {"Content-Type": ct, **(headers or {})}
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        s.sendall(head.encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0
    finally:
        s.close()


def timed_request(port, body, ct="image/jpeg"):
    t = time.time()
    code = request(port, body, ct)
    return code, time.time() - t


def dicom(pixels, rows, cols):
    """A minimal DICOM Part-10 file (explicit VR little endian, 8-bit MONOCHROME2, CR)."""
    def el(group, elem, vr, value):
        if isinstance(value, str):
            value = value.encode()
            if len(value) % 2:
                value += b" " if vr not in ("UI",) else b"\0"
        if vr in ("OB", "OW", "SQ", "UN", "UT"):
            return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value
    us = lambda v: struct.pack("<H", v)
    meta = el(2, 1, "OB", b"\0\1") + el(2, 2, "UI", "1.2.840.10008.5.1.4.1.1.1") + \
        el(2, 3, "UI", "1.2.3.4.5") + el(2, 0x10, "UI", "1.2.840.10008.1.2.1")
    meta = el(2, 0, "UL", struct.pack("<I", len(meta))) + meta
    ds = el(8, 0x16, "UI", "1.2.840.10008.5.1.4.1.1.1") + el(8, 0x18, "UI", "1.2.3.4.5") + \
        el(8, 0x60, "CS", "CR") + el(0x20, 0xD, "UI", "1.2.3.4") + el(0x20, 0xE, "UI", "1.2.3.4.6") + \
        el(0x28, 2, "US", us(1)) + el(0x28, 4, "CS", "MONOCHROME2") + el(0x28, 0x10, "US", us(rows)) + \
        el(0x28, 0x11, "US", us(cols)) + el(0x28, 0x100, "US", us(8)) + el(0x28, 0x101, "US", us(8)) + \
        el(0x28, 0x102, "US", us(7)) + el(0x28, 0x103, "US", us(0)) + el(0x7FE0, 0x10, "OB", pixels)
    return b"\0" * 128 + b"DICM" + meta + ds


def samples(data):
    files = sorted(glob.glob(os.path.join(data, "test", "*", "*.jpeg")))[:20]
    out = [(open(f, "rb").read(), "image/jpeg") for f in files]
    try:
        from PIL import Image
        import io
        for f in files[:10]:
            im = Image.open(f).convert("L")
            b = io.BytesIO()
            im.save(b, "PNG")
            out.append((b.getvalue(), "image/png"))
            out.append((dicom(im.tobytes(), im.size[1], im.size[0]), "application/dicom"))
    except ImportError:
        raise SystemExit("Pillow is needed for the PNG and DICOM samples: run with .venv/bin/python")
    return out


def part_a(port, pid, normal):
    print("== (a) 100 concurrent 32 MiB uploads holding back their last byte")
    size = 32 << 20
    base = rss_mb(pid)
    refused, held, socks, lock = [], [], [], threading.Lock()
    payload = b"\xff" * (size - 1)

    def client():
        s = socket.create_connection((HOST, port), timeout=120)
        t = time.time()
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode())
        s.settimeout(0.5)
        try:
            head = s.recv(64)
            if head:
                with lock:
                    refused.append((int(head.split(b" ")[1]), time.time() - t))
                s.close()
                return
        except socket.timeout:
            pass
        s.settimeout(120)
        try:
            s.sendall(payload)
            with lock:
                held.append(1)
                socks.append(s)
        except OSError:
            s.close()

    ts = [threading.Thread(target=client) for _ in range(100)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    time.sleep(1.0)
    peak_during = rss_mb(pid)
    code, took = timed_request(port, normal)
    print(f"  held {len(held)}, refused {len(refused)} "
          f"(statuses {sorted(set(c for c, _ in refused))}, slowest refusal {max([d for _, d in refused] or [0]) * 1e3:.0f} ms)")
    print(f"  RSS {base:.0f} MB before, {peak_during:.0f} MB with the uploads held, peak {rss_mb(pid, 'VmHWM'):.0f} MB")
    print(f"  a normal JPEG meanwhile: {code} in {took * 1e3:.0f} ms")
    for s in socks:
        s.close()
    time.sleep(1.0)


def part_b(port, normal):
    print("== (b) 256 clients dripping 1 byte/s, plus one normal client")
    stop = time.time() + 8
    socks = []
    for _ in range(256):
        s = socket.create_connection((HOST, port), timeout=30)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        socks.append(s)

    def drip():
        while time.time() < stop:
            for s in socks:
                try:
                    s.send(b"\xff")
                except OSError:
                    pass
            time.sleep(1.0)

    d = threading.Thread(target=drip)
    d.start()
    time.sleep(2.0)
    results = [timed_request(port, normal) for _ in range(3)]
    d.join()
    for s in socks:
        s.close()
    for code, took in results:
        print(f"  normal client: {code} in {took * 1e3:.0f} ms")


def mutate(b, rng):
    b = bytearray(b)
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(b[: rng.randrange(len(b))]), "truncation"
    if kind == 1:
        for _ in range(rng.randrange(1, 20)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), "bit flips"
    if kind == 2:
        # Header edits: overwrite bytes in the first 512 (sizes, markers, tags).
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(min(len(b), 512))
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        return bytes(b), "header edits"
    i = rng.randrange(len(b))
    return bytes(b[:i] + b[i:i + rng.randrange(1, 4096)] * rng.randrange(1, 4) + b[i:]), "repeats"


def part_c(port, pid, data, n):
    print(f"== (c) {n} mutated uploads")
    rng = random.Random(14)
    base = samples(data)
    start = rss_mb(pid)
    counts, by_kind, lock = {}, {}, threading.Lock()
    jobs = [rng.randrange(len(base)) for _ in range(n)]
    seeds = [rng.randrange(1 << 30) for _ in range(n)]
    idx = iter(range(n))
    deadline = time.time() + 1800

    def worker():
        while time.time() < deadline:
            with lock:
                i = next(idx, None)
            if i is None:
                return
            body, ct = base[jobs[i]]
            m, kind = mutate(body, random.Random(seeds[i]))
            code = request(port, m, ct)
            with lock:
                counts[code] = counts.get(code, 0) + 1
                by_kind.setdefault(kind, {}).setdefault(code, 0)
                by_kind[kind][code] += 1

    t0 = time.time()
    ts = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    alive = os.path.exists(f"/proc/{pid}")
    end = rss_mb(pid) if alive else float("nan")
    five = sum(v for k, v in counts.items() if k >= 500 or k == 0)
    print(f"  {sum(counts.values())} requests in {time.time() - t0:.0f} s; statuses {dict(sorted(counts.items()))}")
    for k, v in sorted(by_kind.items()):
        print(f"    {k}: {dict(sorted(v.items()))}")
    print(f"  5xx or no answer: {five}; process alive: {alive}; RSS {start:.0f} MB -> {end:.0f} MB ({(end / start - 1) * 100:+.1f} %)")


def part_d(port, pid, model, clients):
    print(f"== (d) V2 flood: {clients} concurrent ~29 MiB bodies to /v2/models/{model}/infer")
    zeros = 15_000_000
    js = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,224,224],"data":['
          + b"0," * (zeros - 1) + b"0]}]}")
    header = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":28000000}}]}'
    binary = header + bytes(28_000_000)
    before = rss_mb(pid, "VmHWM")
    results, lock = [], threading.Lock()

    def one(i):
        if i % 2 == 0:
            body, ct, headers = js, "application/json", {}
        else:
            body, ct, headers = binary, "application/octet-stream", {
                "Inference-Header-Content-Length": str(len(header))}
        t = time.time()
        code = request(port, body, ct, f"/v2/models/{model}/infer", timeout=120, headers=headers)
        with lock:
            results.append(("json" if i % 2 == 0 else "binary", code, time.time() - t))

    ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    after = rss_mb(pid, "VmHWM")
    for kind in ("json", "binary"):
        rs = [r for r in results if r[0] == kind]
        print(f"  {kind}: statuses {sorted(r[1] for r in rs)}, seconds {[round(r[2], 2) for r in rs]}")
    print(f"  peak RSS (VmHWM) {before:.0f} MB -> {after:.0f} MB (+{after - before:.0f} MB); "
          f"process alive: {os.path.exists(f'/proc/{pid}')}")


def health(port, timeout=5):
    try:
        s = socket.create_connection((HOST, port), timeout=timeout)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = s.recv(64)
        s.close()
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0


def part_e(port, n):
    print(f"== (e) {n} idle h2c connections (preface + empty SETTINGS, then nothing)")
    t0 = time.time()
    conns = []
    for _ in range(n):
        s = socket.create_connection((HOST, port), timeout=60)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        conns.append(s)
    during = health(port, timeout=2)
    closed = [None] * n

    def watch(i):
        s = conns[i]
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        closed[i] = time.time() - t0

    ts = [threading.Thread(target=watch, args=(i,)) for i in range(n)]
    [t.start() for t in ts]
    [t.join(timeout=60) for t in ts]
    after = health(port)
    done = [c for c in closed if c is not None]
    print(f"  /health while they were open: {during or 'no answer'}; closed {len(done)}/{n}, "
          f"after {min(done):.1f}-{max(done):.1f} s" if done else f"  closed 0/{n} within 60 s")
    print(f"  /health after: {after}")
    for s in conns:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray_224"))
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--mutations", type=int, default=10000)
    ap.add_argument("--model", default="weighted", help="variant for (d)")
    ap.add_argument("--flood", type=int, default=4, help="concurrent bodies in (d)")
    ap.add_argument("--idle", type=int, default=20, help="idle h2c connections in (e): the server's --max-connections")
    a = ap.parse_args()
    normal = open(sorted(glob.glob(os.path.join(a.data, "test", "NORMAL", "*.jpeg")))[0], "rb").read()
    print(f"server pid {a.pid}, RSS {rss_mb(a.pid):.0f} MB; CPU flags: " +
          " ".join(sorted({f for f in open('/proc/cpuinfo').read().split() if f in ('avx2', 'avx512f', 'avx512_vnni')})))
    if "a" in a.only:
        part_a(a.port, a.pid, normal)
    if "b" in a.only:
        part_b(a.port, normal)
    if "c" in a.only:
        part_c(a.port, a.pid, a.data, a.mutations)
    if "d" in a.only:
        part_d(a.port, a.pid, a.model, a.flood)
    if "e" in a.only:
        part_e(a.port, a.idle)


if __name__ == "__main__":
    sys.exit(main())
