"""Queueing between clients, threads and processes; wait limits; a holder
that dies."""

from __future__ import annotations

import os
import signal
import time

import pytest
import vramd

from helpers import GIB, WAIT, ReserveThread, finish, python_child, read_line, wait_until

HOLD_AND_SLEEP = """
import sys, time, vramd
r = vramd.Client(sys.argv[1]).reserve(sys.argv[2], label="child-holder")
print("granted", r.id, flush=True)
time.sleep(60)
"""

WAIT_FOR_GRANT = """
import sys, vramd
r = vramd.Client(sys.argv[1]).reserve(sys.argv[2], label="child-waiter", timeout=30)
print("granted", r.id, r.bytes, flush=True)
r.release()
print("released", flush=True)
"""


def test_second_client_waits_for_the_first_threads(daemon):
    holder = daemon.client().reserve("20GiB")
    t = ReserveThread(daemon.client(), "10GiB")
    try:
        assert wait_until(lambda: daemon.queue_len() == 1)
        assert t.is_alive() and t.reservation is None and t.error is None
        holder.release()
        t.join(WAIT)
        assert not t.is_alive()
    finally:
        holder.release()
        t.join(WAIT)
    assert t.error is None, t.error
    r = t.reservation
    assert r is not None
    assert r.bytes == 10 * GIB
    assert daemon.reservation_ids() == [r.id]


def test_queue_order_follows_priority(daemon):
    holder = daemon.client().reserve("24GiB")
    c = daemon.client()
    low = c.submit("10GiB", priority=0, label="low")
    assert wait_until(lambda: daemon.queue_len() == 1)
    high = c.submit("10GiB", priority=10, label="high")
    assert wait_until(lambda: daemon.queue_len() == 2)
    assert [q["label"] for q in daemon.status()["queue"]] == ["high", "low"]
    holder.release()
    r_high = high.poll(WAIT)
    r_low = low.poll(WAIT)
    assert r_high is not None and r_low is not None


def test_second_process_waits_for_the_first(daemon):
    holder = daemon.client().reserve("20GiB")
    child = python_child(WAIT_FOR_GRANT, daemon.socket, "10GiB")
    try:
        assert wait_until(lambda: daemon.queue_len() == 1)
        assert child.poll() is None
        holder.release()
        line = read_line(child)
        assert line.startswith("granted") and line.endswith(str(10 * GIB))
        assert read_line(child) == "released"
        assert child.wait(WAIT) == 0
    finally:
        finish(child)


def test_process_waits_for_another_process(daemon):
    holder = python_child(HOLD_AND_SLEEP, daemon.socket, "20GiB")
    waiter = None
    try:
        assert read_line(holder).startswith("granted")
        waiter = python_child(WAIT_FOR_GRANT, daemon.socket, "10GiB")
        assert wait_until(lambda: daemon.queue_len() == 1)
        holder.terminate()
        assert read_line(waiter).startswith("granted")
        assert waiter.wait(WAIT) == 0
    finally:
        finish(holder)
        if waiter is not None:
            finish(waiter)


def test_grant_after_sigkill_of_the_holder(daemon):
    holder = python_child(HOLD_AND_SLEEP, daemon.socket, "20GiB")
    try:
        assert read_line(holder).startswith("granted")
        c = daemon.client()
        pending = c.submit("10GiB", timeout=WAIT)
        assert wait_until(lambda: pending.poll(0) is None and pending.position == 1)
        os.kill(holder.pid, signal.SIGKILL)
        r = pending.poll(WAIT)
        assert r is not None, "not granted after the holder was killed"
        status = daemon.status()
        assert [x["id"] for x in status["reservations"]] == [r.id]
        assert status["counters"]["disconnect_releases"] == 1
    finally:
        finish(holder)


def test_wait_limit(daemon):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()
    start = time.monotonic()
    with pytest.raises(vramd.WaitTimeout) as info:
        c.reserve("10GiB", timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 5
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, vramd.VramdError)
    assert err.kind == "timeout"
    assert err.socket == daemon.socket
    assert daemon.queue_len() == 0
    assert daemon.status()["counters"]["timeouts"] == 1
    holder.release()


def test_zero_timeout_means_only_if_it_fits_now(daemon):
    c = daemon.client()
    with c.reserve("10GiB", timeout=0) as r:
        assert r.bytes == 10 * GIB
        with pytest.raises(vramd.WaitTimeout):
            c.reserve("20GiB", timeout=0)
