#!/usr/bin/env python3
"""Daemon memory under each resource attack of the hardening review.

Each attack runs against a fresh daemon (`--simulate 24GiB`, log level warn)
and prints one JSON line: the daemon's RSS before, at its peak and after the
attacker left, and the bound the docs give for it (docs/testing.md,
"Hardening"). Fails if a peak passes its bound.

- nonreader: one client fills the device, a second queues 1,000 requests and
  never reads its replies, a third loops reserve/cancel of a high-priority
  request (each move shifts the 1,000 positions). Before the bounded outbox
  this grew by 1.46 GiB in 3.7 s.
- stalled: N binary sessions each start a frame that declares 1 MiB and send
  only its first 64 bytes, then stall (before: about 1 MiB each).
- tiny: one connection holds 60,000 reservations of 1 byte each (before:
  status failed for everyone, and grants slowed 35-fold).
- silent: N connections that never say hello (before: they counted towards
  --max-connections and locked others out).

    python3 bench/attack_rss.py target/release/vramd [ATTACK ...] [--seconds S]

Run it as a user whose open-file limit allows a few thousand sockets (the
script raises its soft limit to the hard one).
"""
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time

MIB = 2**20


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def hello_json(path):
    s = connect(path)
    s.sendall(b'{"hello":{"version":1}}\n')
    f = s.makefile("rb")
    assert b"welcome" in f.readline()
    return s, f


class Daemon:
    def __init__(self, binary, extra=()):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "vramd.sock")
        self.proc = subprocess.Popen(
            [binary, "--simulate", "24GiB", "--socket", self.path,
             "--log-level", "warn", *extra],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                s, _ = hello_json(self.path)
                s.close()
                break
            except OSError:
                time.sleep(0.02)
        time.sleep(0.3)

    def rss(self):
        return rss_bytes(self.proc.pid)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.dir.cleanup()


def nonreader(d, seconds, n):
    holder, hf = hello_json(d.path)
    holder.sendall(b'{"reserve":{"tag":1,"bytes":25769803776}}\n')
    assert b"granted" in hf.readline()
    sleeper, _ = hello_json(d.path)
    sleeper.sendall(b"".join(
        b'{"reserve":{"tag":%d,"bytes":1}}\n' % t for t in range(1, 1001)))
    time.sleep(0.5)
    before = peak = d.rss()
    mover, mf = hello_json(d.path)
    moves = 0
    start = time.time()
    while time.time() - start < seconds:
        mover.sendall(b'{"reserve":{"tag":7,"bytes":1,"priority":10}}\n')
        json.loads(mf.readline())
        mover.sendall(b'{"cancel":{"tag":7}}\n')
        json.loads(mf.readline())
        moves += 2
        if moves % 200 == 0:
            peak = max(peak, d.rss())
    peak = max(peak, d.rss())
    for s in (holder, sleeper, mover):
        s.close()
    # Bound: one connection's unsent replies (--max-unsent-bytes, 8 MiB).
    return before, peak, {"queue_moves": moves}, 8 * MIB


def binary_hello():
    # Binary session: frames of a u32 big-endian length (whose first byte,
    # 0x00, picks the encoding) and a postcard payload;
    # ClientMessage::Hello { version: 1, client: "" } = 00 01 00.
    return struct.pack(">I", 3) + b"\x00\x01\x00"


def stalled(d, seconds, n):
    before = peak = d.rss()
    conns = []
    for i in range(n):
        s = connect(d.path)
        s.sendall(binary_hello())
        # A frame that declares 1 MiB (the cap) and sends 64 bytes of it.
        s.sendall(struct.pack(">I", MIB) + b"\x01" * 64)
        conns.append(s)
        if i % 100 == 0:
            peak = max(peak, d.rss())
    end = time.time() + seconds
    while time.time() < end:
        peak = max(peak, d.rss())
        time.sleep(0.05)
    for s in conns:
        s.close()
    # Bound: per connection, its state plus a read buffer holding what
    # arrived (64 bytes) rounded up to the kept capacity: 16 KiB each.
    return before, peak, {"connections": n}, n * 16 * 1024


def tiny(d, seconds, n):
    s, f = hello_json(d.path)
    before = peak = d.rss()
    batch = 1000
    granted = 0
    for start in range(0, n, batch):
        s.sendall(b"".join(
            b'{"reserve":{"tag":%d,"bytes":1}}\n' % t
            for t in range(start + 1, min(start + batch, n) + 1)))
        for _ in range(min(batch, n - start)):
            line = f.readline()
            if b"granted" in line:
                granted += 1
        peak = max(peak, d.rss())
    s.sendall(b'{"status":{"tag":0}}\n')
    status = json.loads(f.readline())
    assert "status" in status, status
    total = status["status"]["status"]["reservations_total"]
    peak = max(peak, d.rss())
    s.close()
    # Bound: 1 KiB per reservation (its entry and indices).
    return before, peak, {"reservations": granted, "status_total": total}, n * 1024


def silent(d, seconds, n):
    before = peak = d.rss()
    conns = []
    refused = 0
    for i in range(n):
        try:
            conns.append(connect(d.path))
        except OSError:
            refused += 1
        if i % 100 == 0:
            peak = max(peak, d.rss())
    # A legitimate client still gets in at once.
    t = time.time()
    s, _ = hello_json(d.path)
    welcome_ms = (time.time() - t) * 1000
    s.close()
    peak = max(peak, d.rss())
    for c in conns:
        c.close()
    # Bound: --max-handshakes (512) connections in their handshake, 16 KiB
    # each; the rest are closed by the daemon.
    return before, peak, {"connections": n, "refused_by_os": refused,
                          "legitimate_welcome_ms": round(welcome_ms, 1)}, 512 * 16 * 1024


ATTACKS = {"nonreader": (nonreader, 1000), "stalled": (stalled, 2000),
           "tiny": (tiny, 60000), "silent": (silent, 2000)}


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    binary = args[0]
    seconds = 3.7
    names = []
    rest = args[1:]
    while rest:
        a = rest.pop(0)
        if a == "--seconds":
            seconds = float(rest.pop(0))
        else:
            names.append(a)
    names = names or list(ATTACKS)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    failed = False
    for name in names:
        fn, n = ATTACKS[name]
        d = Daemon(binary)
        try:
            base = d.rss()
            before, peak, extra, bound = fn(d, seconds, n)
            time.sleep(0.5)
            after = d.rss()
            ok = peak - base <= bound
            failed |= not ok
            print(json.dumps({
                "attack": name,
                **extra,
                "rss_idle_mib": round(base / MIB, 1),
                "rss_before_mib": round(before / MIB, 1),
                "rss_peak_mib": round(peak / MIB, 1),
                "rss_after_mib": round(after / MIB, 1),
                "growth_mib": round((peak - base) / MIB, 1),
                "bound_mib": round(bound / MIB, 1),
                "within_bound": ok,
            }), flush=True)
        finally:
            d.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
