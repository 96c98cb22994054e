"""Reserving and releasing: the blocking API and the Reservation lifecycle."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import vramd

from helpers import GIB, WAIT, wait_until


def test_reserve_release(daemon):
    c = daemon.client()
    r = c.reserve("8GiB", label="flux", priority=5, timeout=60)
    assert isinstance(r, vramd.Reservation)
    assert r.bytes == 8 * GIB
    assert r.device_index == 0
    assert r.device_uuid == "SIM-0"
    assert r.label == "flux"
    assert r.priority == 5
    assert r.client is c
    assert not r.released
    held = daemon.status()["reservations"]
    assert [(x["id"], x["bytes"], x["label"], x["priority"]) for x in held] == [
        (r.id, 8 * GIB, "flux", 5)
    ]
    r.release()
    assert r.released
    assert daemon.reservation_ids() == []
    r.release()  # idempotent
    assert daemon.status()["counters"]["releases"] == 1


def test_context_manager_releases(daemon):
    c = daemon.client()
    with c.reserve("1GiB") as r:
        assert daemon.reservation_ids() == [r.id]
    assert r.released
    assert daemon.reservation_ids() == []


def test_context_manager_releases_on_exception(daemon):
    c = daemon.client()
    with pytest.raises(ValueError, match="boom"):
        with c.reserve("1GiB") as r:
            assert daemon.reservation_ids() == [r.id]
            raise ValueError("boom")
    assert r.released
    assert daemon.reservation_ids() == []


def test_garbage_collection_releases(daemon):
    c = daemon.client()
    r = c.reserve("1GiB")
    rid = r.id
    assert daemon.reservation_ids() == [rid]
    del r
    gc.collect()
    assert wait_until(lambda: daemon.reservation_ids() == [], WAIT)
    c.ping()  # the client is still fine


def test_close_releases_everything(daemon):
    c = daemon.client()
    a = c.reserve("1GiB")
    b = c.reserve("2GiB")
    assert daemon.reservation_ids() == sorted([a.id, b.id])
    c.close()
    assert c.closed and a.released and b.released
    assert wait_until(lambda: daemon.reservation_ids() == [], WAIT)
    c.close()  # idempotent
    a.release()  # already released with the connection: no error
    with pytest.raises(vramd.Disconnected, match="closed"):
        c.reserve("1GiB")


def test_client_context_manager(daemon):
    with daemon.client() as c:
        r = c.reserve("1GiB")
        assert daemon.reservation_ids() == [r.id]
    assert c.closed
    assert wait_until(lambda: daemon.reservation_ids() == [], WAIT)


def test_reservation_keeps_its_client_alive(daemon):
    r = daemon.client().reserve("1GiB")  # the client is not referenced elsewhere
    gc.collect()
    assert daemon.reservation_ids() == [r.id]
    r.client.ping()
    r.release()
    assert daemon.reservation_ids() == []


def test_sizes_as_ints_and_strings(daemon):
    c = daemon.client()
    with c.reserve(12345) as r:
        assert r.bytes == 12345
    with c.reserve("8GB") as r:
        assert r.bytes == 8_000_000_000
    with c.reserve("512MiB") as r:
        assert r.bytes == 512 << 20
    with c.reserve("1.5GiB") as r:
        assert r.bytes == 3 * GIB // 2


def test_device_selection(two_devices):
    c = two_devices.client()
    with c.reserve("1GiB", device=1) as r:
        assert (r.device_index, r.device_uuid) == (1, "SIM-1")
    with c.reserve("1GiB", device="SIM-1") as r:
        assert r.device_index == 1
    with c.reserve("1GiB", device="1") as r:
        assert r.device_index == 1
    with c.reserve("1GiB", device=0) as r:
        assert r.device_index == 0
    with c.reserve("1GiB", device="any") as r:
        assert r.device_index in (0, 1)
    with c.reserve("1GiB", device=None) as r:
        assert r.device_index in (0, 1)
    # 16 GiB fits only on the 24 GiB device.
    with c.reserve("16GiB") as r:
        assert r.device_index == 0


def test_several_reservations_share_a_client(daemon):
    c = daemon.client()
    rs = [c.reserve("1GiB", label=f"r{i}") for i in range(5)]
    assert daemon.reservation_ids() == sorted(r.id for r in rs)
    for r in rs[::2]:
        r.release()
    assert daemon.reservation_ids() == sorted(r.id for r in rs[1::2])


def test_repr(daemon):
    c = daemon.client()
    assert daemon.socket in repr(c)
    r = c.reserve("1GiB", label="x")
    assert f"id={r.id}" in repr(r) and "1.00 GiB" in repr(r) and "released" not in repr(r)
    r.release()
    assert "released" in repr(r)
    assert c.daemon_version
    assert c.socket == daemon.socket


def test_pending_api(daemon):
    c = daemon.client()
    holder = c.reserve("20GiB")
    p = c.submit("10GiB", label="waiter")
    assert p.bytes == 10 * GIB
    assert p.poll() is None  # a look, no wait
    assert p.poll(0.05) is None
    assert wait_until(lambda: p.poll(0) is None and p.position == 1)
    assert p.id is not None and not p.done
    assert "waiting" in repr(p)
    holder.release()
    r = p.poll(WAIT)
    assert r is not None and r.id == p.id and r.label == "waiter"
    assert p.done and not p.cancelled
    with pytest.raises(vramd.VramdError, match="already granted"):
        p.poll()
    r.release()


def test_pending_cancel(daemon):
    c = daemon.client()
    holder = c.reserve("20GiB")
    p = c.submit("10GiB")
    assert wait_until(lambda: daemon.queue_len() == 1)
    p.cancel()
    assert p.cancelled and p.done
    with pytest.raises(vramd.Cancelled):
        p.poll()
    with pytest.raises(vramd.Cancelled):
        p.wait()
    assert wait_until(lambda: daemon.queue_len() == 0)
    p.cancel()  # idempotent
    holder.release()


def test_dropping_a_pending_withdraws_it(daemon):
    c = daemon.client()
    holder = c.reserve("20GiB")
    p = c.submit("10GiB")
    assert wait_until(lambda: daemon.queue_len() == 1)
    del p
    gc.collect()
    assert wait_until(lambda: daemon.queue_len() == 0)
    holder.release()


def test_attach_pids(daemon):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(WAIT)
    try:
        with daemon.client().reserve("1GiB") as r:
            pids = r.attach_pids([worker.pid])
            assert worker.pid in pids
            (held,) = daemon.status()["reservations"]
            assert worker.pid in held["pids"]
            with pytest.raises(vramd.PermissionDenied) as info:
                r.attach_pids([gone.pid])
            assert info.value.kind == "permission_denied"
            assert isinstance(info.value, PermissionError)
        with pytest.raises(vramd.VramdError, match="released"):
            r.attach_pids([worker.pid])
    finally:
        worker.kill()
        worker.wait(WAIT)


def test_for_pids_leaves_this_process_out_and_resize(daemon):
    c = daemon.client()
    child = subprocess.Popen(["sleep", "30"])
    try:
        r = c.reserve("4GiB", for_pids=[child.pid], label="runner")
        held = daemon.status()["reservations"]
        assert [x["pids"] for x in held] == [[child.pid]]
        none = c.reserve("1GiB", for_pids=[])
        assert [x["pids"] for x in daemon.status()["reservations"]] == [
            [child.pid],
            [],
        ]
        none.release()
        # Grow into free room, shrink; never past the device; not into room
        # another holds: WaitTimeout, size kept.
        r.resize("6GiB")
        assert r.bytes == 6 * GIB
        assert daemon.status()["reservations"][0]["bytes"] == 6 * GIB
        r.resize(2 * GIB)
        assert r.bytes == 2 * GIB
        with pytest.raises(vramd.Refused):
            r.resize("30GiB")
        blocker = c.reserve("20GiB")
        with pytest.raises(vramd.WaitTimeout):
            r.resize("5GiB")
        assert r.bytes == 2 * GIB
        blocker.release()
        with pytest.raises(vramd.PermissionDenied):
            c.reserve("1GiB", for_pids=[2**32 - 7])
        r.release()
    finally:
        child.kill()
        child.wait()
