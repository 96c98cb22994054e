"""client.status() has the schema of `vramctl status --json`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import GIB, VRAMCTL_BIN, WAIT, wait_until

TOP_LEVEL = {"daemon_version", "backend", "uptime_ms", "devices", "reservations", "queue", "counters"}
DEVICE = {
    "index",
    "uuid",
    "name",
    "total_bytes",
    "used_bytes",
    "reserved_bytes",
    "cushion_bytes",
    "committed_bytes",
    "available_bytes",
}
RESERVATION = {"id", "device", "bytes", "label", "pid", "uid", "priority", "age_ms"}
QUEUE_ENTRY = {"id", "position", "bytes", "device", "priority", "label", "pid", "uid", "waited_ms"}
COUNTERS = {"grants", "releases", "disconnect_releases", "timeouts", "refusals", "cancels"}


def shape(value):
    """The structure of a JSON value: keys and value types, recursively."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_status_schema(daemon):
    c = daemon.client()
    holder = c.reserve("20GiB", label="holder", priority=3)
    waiter = daemon.client().submit("10GiB", label="waiter")
    assert wait_until(lambda: daemon.queue_len() == 1)
    s = c.status()
    assert TOP_LEVEL <= set(s)
    assert s["backend"] == "simulated"
    assert s["daemon_version"] == c.daemon_version
    (device,) = s["devices"]
    assert DEVICE <= set(device)
    assert device["total_bytes"] == 24 * GIB and device["uuid"] == "SIM-0"
    (held,) = s["reservations"]
    assert RESERVATION <= set(held)
    assert (held["id"], held["bytes"], held["label"], held["priority"], held["pid"]) == (
        holder.id,
        20 * GIB,
        "holder",
        3,
        os.getpid(),
    )
    (queued,) = s["queue"]
    assert QUEUE_ENTRY <= set(queued)
    assert (queued["position"], queued["bytes"], queued["label"], queued["device"]) == (
        1,
        10 * GIB,
        "waiter",
        "any",
    )
    assert COUNTERS <= set(s["counters"])
    assert s["counters"]["grants"] == 1
    waiter.cancel()


def test_status_matches_vramctl_json(daemon):
    if not VRAMCTL_BIN.exists():
        pytest.fail(f"no vramctl at {VRAMCTL_BIN}: build it with `cargo build -p vramctl`")
    c = daemon.client()
    holder = c.reserve("20GiB", label="holder")
    waiter = daemon.client().submit("10GiB", label="waiter", device=0)
    assert wait_until(lambda: daemon.queue_len() == 1)
    ours = c.status()
    env = dict(os.environ, VRAMD_SOCKET=daemon.socket)
    out = subprocess.run(
        [str(VRAMCTL_BIN), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    theirs = json.loads(out.stdout)
    assert shape(ours) == shape(theirs)
    for key in ("devices", "reservations", "queue"):
        strip = lambda items: [  # noqa: E731 - ages and waits move on
            {k: v for k, v in x.items() if k not in ("age_ms", "waited_ms")} for x in items
        ]
        assert strip(ours[key]) == strip(theirs[key])
    waiter.cancel()
    holder.release()
