"""asyncio: reserve without blocking the event loop; cancellation withdraws."""

from __future__ import annotations

import asyncio
import time

import pytest
import vramd

from helpers import GIB, WAIT, wait_until


def run(coro):
    """Runs a test coroutine with a bound on its whole duration."""
    return asyncio.run(asyncio.wait_for(coro, WAIT * 2))


def test_async_with(daemon):
    c = daemon.client()

    async def main():
        async with c.reserve_async("8GiB", label="async") as r:
            assert isinstance(r, vramd.Reservation)
            assert r.bytes == 8 * GIB and r.label == "async"
            assert not r.released
            ids = await asyncio.get_running_loop().run_in_executor(None, daemon.reservation_ids)
            assert ids == [r.id]
        assert r.released
        return r

    run(main())
    assert daemon.reservation_ids() == []


def test_async_with_releases_on_exception(daemon):
    c = daemon.client()

    async def main():
        async with c.reserve_async("1GiB"):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run(main())
    assert daemon.reservation_ids() == []


def test_await_and_reservation_as_async_context_manager(daemon):
    c = daemon.client()

    async def main():
        r = await c.reserve_async("1GiB")
        assert daemon.reservation_ids() == [r.id]
        async with r as same:
            assert same is r
        assert r.released

    run(main())
    assert daemon.reservation_ids() == []


def test_event_loop_keeps_running_while_waiting(daemon):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(c.reserve_async("10GiB", timeout=WAIT))
        start = time.monotonic()
        ticks = 0
        while time.monotonic() - start < 0.5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 20, f"the event loop ran only {ticks} times in 0.5s"
        assert not task.done()
        assert await loop.run_in_executor(None, daemon.queue_len) == 1
        await loop.run_in_executor(None, holder.release)
        r = await asyncio.wait_for(task, WAIT)
        assert r.bytes == 10 * GIB
        r.release()

    run(main())


def test_cancelling_the_task_withdraws_the_request(daemon):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(c.reserve_async("10GiB"))
        for _ in range(int(WAIT / 0.02)):
            if await loop.run_in_executor(None, daemon.queue_len) == 1:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert wait_until(lambda: daemon.queue_len() == 0)
    assert daemon.status()["counters"]["cancels"] == 1
    holder.release()
    assert daemon.reservation_ids() == []


def test_asyncio_wait_for_timeout_withdraws_the_request(daemon):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.reserve_async("10GiB"), 0.3)

    run(main())
    assert wait_until(lambda: daemon.queue_len() == 0)
    holder.release()
    assert wait_until(lambda: daemon.reservation_ids() == [])


def test_async_wait_limit_and_errors(daemon):
    holder = daemon.client().reserve("20GiB")
    c = daemon.client()

    async def main():
        with pytest.raises(vramd.WaitTimeout):
            await c.reserve_async("10GiB", timeout=0.2)
        with pytest.raises(vramd.Refused):
            await c.reserve_async("100GiB")

    run(main())
    holder.release()


def test_many_concurrent_async_waits(daemon):
    holder = daemon.client().reserve("24GiB")
    c = daemon.client()

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [
            asyncio.ensure_future(c.reserve_async("2GiB", label=f"t{i}", timeout=WAIT))
            for i in range(10)
        ]
        for _ in range(int(WAIT / 0.02)):
            if await loop.run_in_executor(None, daemon.queue_len) == 10:
                break
            await asyncio.sleep(0.02)
        await loop.run_in_executor(None, holder.release)
        rs = await asyncio.gather(*tasks)
        assert sorted(r.label for r in rs) == sorted(f"t{i}" for i in range(10))
        for r in rs:
            r.release()

    run(main())
    assert daemon.reservation_ids() == []


def test_module_level_reserve_async(daemon, monkeypatch):
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)

    async def main():
        async with vramd.reserve_async("1GiB", label="module") as r:
            assert r.client.socket == daemon.socket
            assert [x["label"] for x in daemon.status()["reservations"]] == ["module"]
        return r

    r = run(main())
    assert r.released


def test_wait_async_on_a_pending(daemon):
    c = daemon.client()

    async def main():
        r = await vramd.wait_async(c.submit("1GiB"))
        r.release()

    run(main())
