"""Blocking waits release the GIL and stay interruptible by Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import vramd

from helpers import WAIT, ReserveThread, wait_until


def test_ctrl_c_cancels_the_wait(daemon, default_sigint):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            c.reserve("10GiB", timeout=WAIT)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"KeyboardInterrupt took {elapsed:.2f}s"
    # The request was withdrawn, and the client still works.
    assert wait_until(lambda: daemon.queue_len() == 0)
    assert daemon.status()["counters"]["cancels"] == 1
    c.ping()
    holder.release()
    with c.reserve("10GiB", timeout=WAIT) as r:
        assert daemon.reservation_ids() == [r.id]


def test_ctrl_c_cancels_pending_wait(daemon, default_sigint):
    holder = daemon.client().reserve("20GiB")
    p = daemon.client().submit("10GiB")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            p.wait()
    finally:
        timer.cancel()
    assert p.cancelled
    assert wait_until(lambda: daemon.queue_len() == 0)
    holder.release()


def test_other_threads_run_while_one_waits(daemon):
    """The waiting thread releases the GIL: a pure-Python thread keeps
    ticking during the whole wait."""
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    t = threading.Thread(target=tick)
    t.start()
    try:
        start = time.monotonic()
        with pytest.raises(vramd.WaitTimeout):
            c.reserve("10GiB", timeout=1.0)
        end = time.monotonic()
    finally:
        stop.set()
        t.join(WAIT)
    during = [x for x in ticks if start + 0.1 < x < end - 0.1]
    assert len(during) >= 20, f"only {len(during)} ticks during a {end - start:.2f}s wait"
    holder.release()


def test_main_thread_runs_while_a_thread_waits(daemon):
    """A thread blocked in reserve() does not hold the GIL: the main thread
    computes and talks to the daemon meanwhile."""
    holder = daemon.client().reserve("20GiB")
    t = ReserveThread(daemon.client(), "10GiB")
    try:
        assert wait_until(lambda: daemon.queue_len() == 1)
        count = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            count += 1
        assert t.is_alive(), "the waiting thread finished early"
        assert count > 10_000
        holder.release()
        t.join(WAIT)
    finally:
        holder.release()
        t.join(WAIT)
    assert t.reservation is not None, t.error
