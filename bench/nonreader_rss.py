#!/usr/bin/env python3
"""Daemon memory under the non-reader attack of the hardening review.

One client fills the device, a second queues 1,000 requests and never reads
its replies, a third loops reserve/cancel of a high-priority request (each
move shifts the 1,000 positions). Prints the daemon's RSS before and at its
peak. Before the bounded outbox this grew by 1.46 GiB in 3.7 s (release);
it must stay under 64 MiB.

    python3 bench/nonreader_rss.py target/release/vramd [SECONDS]
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


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
    s.sendall(b'{"hello":{"version":1}}\n')
    f = s.makefile("rb")
    assert b"welcome" in f.readline()
    return s, f


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.7
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vramd.sock")
        daemon = subprocess.Popen(
            [binary, "--simulate", "24GiB", "--socket", path, "--log-level", "warn"],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 10
            while not os.path.exists(path) and time.time() < deadline:
                time.sleep(0.01)
            holder, hf = connect(path)
            holder.sendall(b'{"reserve":{"tag":1,"bytes":25769803776}}\n')
            assert b"granted" in hf.readline()
            sleeper, _ = connect(path)
            sleeper.sendall(b"".join(
                b'{"reserve":{"tag":%d,"bytes":1}}\n' % t for t in range(1, 1001)))
            time.sleep(0.5)
            before = peak = rss_bytes(daemon.pid)
            mover, mf = connect(path)
            moves = 0
            start = time.time()
            while time.time() - start < seconds:
                mover.sendall(b'{"reserve":{"tag":7,"bytes":1,"priority":10}}\n')
                json.loads(mf.readline())
                mover.sendall(b'{"cancel":{"tag":7}}\n')
                json.loads(mf.readline())
                moves += 2
                if moves % 200 == 0:
                    peak = max(peak, rss_bytes(daemon.pid))
            peak = max(peak, rss_bytes(daemon.pid))
            elapsed = time.time() - start
            print(json.dumps({
                "queue_moves": moves,
                "seconds": round(elapsed, 2),
                "rss_before_mib": round(before / 2**20, 1),
                "rss_peak_mib": round(peak / 2**20, 1),
                "growth_mib": round((peak - before) / 2**20, 1),
            }))
            assert peak < 64 * 2**20, "daemon RSS passed 64 MiB"
        finally:
            daemon.kill()
            daemon.wait()


if __name__ == "__main__":
    main()
