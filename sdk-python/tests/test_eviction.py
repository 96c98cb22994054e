"""Eviction from Python: idle and evictable reservations, on_evict callbacks,
and the daemon taking memory back for a waiter in another client."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time

import pytest
import vramd

from helpers import GIB, WAIT, finish, python_child, read_line, wait_until

# Idle reservations may be evicted as soon as they are granted, and a holder
# has 600 ms to unload.
pytestmark = pytest.mark.daemon_args("--min-residency", "0s", "--eviction-deadline", "600ms")
DEADLINE = 0.6


def idle_flags(daemon) -> dict:
    """Each reservation's ``idle`` flag as the daemon reports it, by id."""
    return {r["id"]: r["idle"] for r in daemon.status()["reservations"]}


def counters(daemon) -> tuple:
    c = daemon.status()["counters"]
    return (c["evictions_requested"], c["evictions_completed"], c["evictions_failed"])


def test_callback_runs_then_the_waiter_in_another_client_gets_the_room(daemon):
    r = daemon.client().reserve("20GiB", label="chat", evictable=True)
    seen = []
    unloaded = threading.Event()

    def unload(eviction):
        seen.append((eviction, threading.current_thread() is threading.main_thread()))
        time.sleep(0.1)  # "unloading the model"
        unloaded.set()

    assert r.on_evict(unload) is unload
    assert not r.evicted and not r.released
    waiter = daemon.client()
    g = waiter.reserve("10GiB", label="image", timeout=WAIT)
    assert unloaded.is_set(), "granted before the callback returned"
    [(eviction, on_main_thread)] = seen
    assert not on_main_thread
    assert isinstance(eviction, vramd.Eviction)
    assert eviction.id == r.id
    assert eviction.deadline == pytest.approx(DEADLINE)
    assert "10.00 GiB" in eviction.reason and "image" in eviction.reason
    assert wait_until(lambda: r.evicted)
    assert r.released
    assert daemon.reservation_ids() == [g.id]
    assert wait_until(lambda: counters(daemon) == (1, 1, 0)), counters(daemon)
    r.release()  # nothing left to release: a no-op
    g.release()


def test_a_busy_reservation_is_never_asked(daemon):
    r = daemon.client().reserve("20GiB")  # busy: not evictable
    asked = []
    r.on_evict(asked.append)
    waiter = daemon.client()
    start = time.monotonic()
    with pytest.raises(vramd.WaitTimeout):
        waiter.reserve("10GiB", timeout=0.4)
    assert time.monotonic() - start >= 0.35
    assert asked == []
    assert not r.evicted and not r.released
    assert idle_flags(daemon) == {r.id: False}
    assert counters(daemon) == (0, 0, 0)
    r.release()


def test_set_idle_later_lets_the_waiter_in(daemon):
    r = daemon.client().reserve("20GiB", label="chat")
    asked = []
    r.on_evict(asked.append)
    waiter = daemon.client()
    p = waiter.submit("10GiB", timeout=WAIT)
    assert wait_until(lambda: p.poll(0) is None and p.position == 1)
    time.sleep(0.3)
    assert p.poll(0) is None and asked == []
    r.set_idle(True)
    g = p.poll(WAIT)
    assert g is not None, "not granted after the holder went idle"
    assert [e.id for e in asked] == [r.id]
    assert wait_until(lambda: r.evicted)
    assert daemon.reservation_ids() == [g.id]


def test_set_idle_false_makes_an_evictable_reservation_busy(daemon):
    r = daemon.client().reserve("20GiB", evictable=True)
    asked = []
    r.on_evict(asked.append)
    r.set_idle(False)
    assert idle_flags(daemon) == {r.id: False}
    waiter = daemon.client()
    with pytest.raises(vramd.WaitTimeout):
        waiter.reserve("10GiB", timeout=0.4)
    assert asked == [] and not r.evicted
    r.set_idle()  # idle=True by default
    assert idle_flags(daemon) == {r.id: True}
    g = waiter.reserve("10GiB", timeout=WAIT)
    assert [e.id for e in asked] == [r.id]
    assert wait_until(lambda: r.evicted)
    g.release()


def test_evictable_at_creation(daemon, monkeypatch):
    c = daemon.client()
    busy = c.reserve("1GiB")
    idle = c.reserve("1GiB", evictable=True)
    submitted = c.submit("1GiB", evictable=True).wait()
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
    module_level = vramd.reserve("1GiB", evictable=True)

    async def via_asyncio():
        return (
            await c.reserve_async("1GiB", evictable=True),
            await vramd.reserve_async("1GiB", evictable=True),
        )

    a, b = asyncio.run(asyncio.wait_for(via_asyncio(), WAIT))
    assert idle_flags(daemon) == {
        busy.id: False,
        idle.id: True,
        submitted.id: True,
        module_level.id: True,
        a.id: True,
        b.id: True,
    }
    busy.set_idle(True)
    idle.set_idle(False)
    flags = idle_flags(daemon)
    assert (flags[busy.id], flags[idle.id]) == (True, False)
    with pytest.raises(TypeError):
        c.reserve("1GiB", evictable="yes")
    for r in (busy, idle, submitted, module_level, a, b):
        r.release()


def test_a_callback_that_raises_still_releases(daemon, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    r = daemon.client().reserve("20GiB", evictable=True)

    @r.on_evict
    def unload(eviction):
        raise ValueError(f"cannot unload {eviction.id}")

    g = daemon.client().reserve("10GiB", timeout=WAIT)
    assert wait_until(lambda: r.evicted)
    assert wait_until(lambda: reported)
    [args] = reported
    assert isinstance(args.exc_value, ValueError)
    assert str(args.exc_value) == f"cannot unload {r.id}"
    assert args.object is unload
    assert daemon.reservation_ids() == [g.id]
    g.release()


def test_without_a_callback_an_evicted_reservation_is_released_at_once(daemon):
    r = daemon.client().reserve("20GiB", evictable=True)
    g = daemon.client().reserve("10GiB", timeout=WAIT)
    assert wait_until(lambda: r.evicted)
    assert daemon.reservation_ids() == [g.id]
    g.release()


def test_evicted_property_and_use_after_an_eviction(daemon):
    r = daemon.client().reserve("20GiB", label="warm", evictable=True)
    assert r.evicted is False and "evicted" not in repr(r)
    r.on_evict(lambda e: None)
    g = daemon.client().reserve("10GiB", timeout=WAIT)
    assert wait_until(lambda: r.evicted)
    assert r.evicted is True and r.released is True
    assert "evicted" in repr(r)
    with pytest.raises(vramd.NotFound, match="evicted"):
        r.set_idle(False)
    with pytest.raises(vramd.NotFound, match="evicted"):
        r.attach_pids([])
    r.release()
    r.release()
    assert r.evicted
    g.release()


def test_with_blocks_exit_quietly_after_an_eviction(daemon):
    holder = daemon.client()
    waiter = daemon.client()
    with holder.reserve("20GiB", evictable=True) as r:
        r.on_evict(lambda e: None)
        g = waiter.reserve("10GiB", timeout=WAIT)
        assert wait_until(lambda: r.evicted)
    g.release()

    async def main():
        async with holder.reserve_async("20GiB", evictable=True) as r:
            g = await waiter.reserve_async("10GiB", timeout=WAIT)
            assert await asyncio.get_running_loop().run_in_executor(
                None, wait_until, lambda: r.evicted
            )
        g.release()
        return r

    r = asyncio.run(asyncio.wait_for(main(), WAIT * 2))
    assert r.evicted and daemon.reservation_ids() == []


def test_a_with_block_that_exits_while_the_callback_runs(daemon):
    started, finish = threading.Event(), threading.Event()
    waiter = daemon.client()

    def unload(eviction):
        started.set()
        finish.wait(WAIT)

    with daemon.client().reserve("20GiB", evictable=True) as r:
        r.on_evict(unload)
        p = waiter.submit("10GiB", timeout=WAIT)
        assert started.wait(WAIT)
    # Released by the block while the callback still ran: no error, and the
    # waiter gets the room.
    g = p.poll(WAIT)
    assert g is not None
    finish.set()
    assert wait_until(lambda: r.evicted)
    assert daemon.reservation_ids() == [g.id]
    g.release()


def test_a_callback_may_release_the_reservation_itself(daemon):
    r = daemon.client().reserve("20GiB", evictable=True)

    @r.on_evict
    def unload(eviction):
        r.release()

    g = daemon.client().reserve("10GiB", timeout=WAIT)
    assert wait_until(lambda: r.evicted)
    assert r.released and daemon.reservation_ids() == [g.id]
    g.release()


def test_on_evict_arguments(daemon):
    r = daemon.client().reserve("1GiB")
    with pytest.raises(TypeError, match="callable"):
        r.on_evict(42)
    first, second = [], []
    r.on_evict(first.append)
    assert r.on_evict(second.append) == second.append  # replaces the first
    r.release()
    with pytest.raises(vramd.VramdError, match="released"):
        r.on_evict(first.append)


def test_a_callback_set_after_the_eviction_runs_at_once(daemon):
    r = daemon.client().reserve("20GiB", evictable=True)
    g = daemon.client().reserve("10GiB", timeout=WAIT)
    assert wait_until(lambda: r.evicted)
    calls = []
    r.on_evict(lambda e: calls.append((e.id, threading.current_thread())))
    assert calls == [(r.id, threading.current_thread())]
    g.release()


def test_an_asyncio_waiter_is_granted_by_an_eviction(daemon):
    r = daemon.client().reserve("20GiB", label="chat", evictable=True)
    unloaded = threading.Event()

    @r.on_evict
    def unload(eviction):
        time.sleep(0.1)
        unloaded.set()

    c = daemon.client()

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        try:
            async with c.reserve_async("10GiB", label="image", timeout=WAIT) as g:
                assert unloaded.is_set(), "granted before the callback returned"
                assert g.bytes == 10 * GIB
        finally:
            ticker.cancel()
        return ticks

    ticks = asyncio.run(asyncio.wait_for(main(), WAIT * 2))
    assert ticks >= 5, "the event loop was blocked during the eviction"
    assert wait_until(lambda: r.evicted)
    assert daemon.reservation_ids() == []


def test_a_callback_that_refers_to_its_reservation_does_not_keep_it_alive(daemon):
    class Model:
        def __init__(self, client):
            self.reservation = client.reserve("20GiB", evictable=True)
            self.reservation.on_evict(self.unload)  # a cycle through the callback

        def unload(self, eviction):
            pass

    model = Model(daemon.client())
    assert len(daemon.reservation_ids()) == 1
    del model
    gc.collect()
    assert wait_until(lambda: daemon.reservation_ids() == [])


EXIT_DURING_CALLBACK = r"""
import sys, threading, time, vramd
r = vramd.Client(sys.argv[1]).reserve("20GiB", evictable=True)
started = threading.Event()
def unload(eviction):
    started.set()
    time.sleep(float(sys.argv[2]))
    print("unloaded", flush=True)
r.on_evict(unload)
print("granted", flush=True)
started.wait(10)
sys.exit(0)  # while the callback runs
"""


@pytest.mark.parametrize("unload_seconds", [0, 0.2])
def test_the_interpreter_exits_after_a_running_callback(daemon, unload_seconds):
    child = python_child(EXIT_DURING_CALLBACK, daemon.socket, str(unload_seconds))
    try:
        assert read_line(child) == "granted"
        g = daemon.client().reserve("10GiB", timeout=WAIT)
        out, err = child.communicate(timeout=WAIT)
        assert child.returncode == 0, err
        assert out.split() == ["unloaded"], (out, err)
        g.release()
    finally:
        finish(child)


def test_exit_waits_for_a_callback_no_longer_than_its_deadline(daemon):
    child = python_child(EXIT_DURING_CALLBACK, daemon.socket, "5")
    try:
        assert read_line(child) == "granted"
        p = daemon.client().submit("10GiB", timeout=WAIT)
        start = time.monotonic()
        out, err = child.communicate(timeout=WAIT)
        assert time.monotonic() - start < DEADLINE + 2.0
        assert child.returncode == 0, err
        assert out.split() == []
        assert p.poll(WAIT) is not None  # the child's exit released it
    finally:
        finish(child)


def test_eviction_objects():
    e = vramd.Eviction(7, 0.6, "request 8 for 10.00 GiB waits")
    assert (e.id, e.deadline, e.reason) == (7, 0.6, "request 8 for 10.00 GiB waits")
    assert "id=7" in repr(e)
