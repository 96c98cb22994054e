"""asyncio support: waiting for a grant without blocking the event loop.

A wait runs in a helper thread that polls the request in short slices (with
the GIL released while it blocks) and hands the outcome to the event loop
with ``call_soon_threadsafe``. Cancelling the awaiting task withdraws the
request; a grant that crosses the cancellation is released.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generator, Optional, Sequence, Type, Union

from . import _default

if TYPE_CHECKING:
    from ._vramd import Client, Pending, Reservation

__all__ = ["ReserveAsync", "wait_async", "release_async"]

# How long one poll in the helper thread blocks: the longest a cancelled
# request stays queued before it is withdrawn.
_POLL_SECONDS = 0.1


class ReserveAsync:
    """A reservation request for asyncio code, from ``Client.reserve_async()``.

    Await it for the :class:`~vramd.Reservation`
    (``r = await client.reserve_async("8GiB")``), or use it as an async
    context manager, which releases the reservation when the block exits::

        async with client.reserve_async("8GiB", label="flux") as r:
            ...

    ``client`` ``None`` means the module's default client. The request is
    sent when it is awaited or entered. Cancelling the
    awaiting task (``asyncio.wait_for``, ``task.cancel()``) withdraws it.
    """

    __slots__ = ("_client", "_size", "_kwargs", "_reservation")

    def __init__(
        self,
        client: Optional[Client],
        size: Union[int, str],
        *,
        device: Union[None, int, str] = None,
        priority: int = 0,
        label: Optional[str] = None,
        timeout: Optional[float] = None,
        evictable: bool = False,
        for_pids: Optional[Sequence[int]] = None,
    ) -> None:
        self._client = client
        self._size = size
        self._kwargs: dict[str, Any] = {
            "device": device,
            "priority": priority,
            "label": label,
            "timeout": timeout,
            "evictable": evictable,
            "for_pids": None if for_pids is None else list(for_pids),
        }
        self._reservation: Optional[Reservation] = None

    def __await__(self) -> Generator[Any, None, Reservation]:
        return self._reserve().__await__()

    async def __aenter__(self) -> Reservation:
        self._reservation = await self._reserve()
        return self._reservation

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            await release_async(reservation)
        return False

    async def _reserve(self) -> Reservation:
        if self._client is None:
            pending = _default.submit(self._size, **self._kwargs)
        else:
            pending = self._client.submit(self._size, **self._kwargs)
        return await wait_async(pending)

    def __repr__(self) -> str:
        return f"<vramd.ReserveAsync size={self._size!r} {self._kwargs!r}>"


async def wait_async(pending: Pending) -> Reservation:
    """Awaits the grant of ``pending`` (from ``Client.submit()``) without
    blocking the event loop, and returns the :class:`~vramd.Reservation`.
    Cancelling the awaiting task withdraws the request."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Reservation] = loop.create_future()

    def settle(result: Optional[Reservation], error: Optional[BaseException]) -> None:
        if future.done():
            # The awaiting task was cancelled meanwhile. A reservation granted
            # in that window is released when `result` is dropped here.
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def wait_in_thread() -> None:
        result: Optional[Reservation] = None
        error: Optional[BaseException] = None
        try:
            while result is None:
                result = pending.poll(_POLL_SECONDS)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            # The event loop is closed; nobody awaits any more. A reservation
            # is released when `result` is dropped.
            pass

    threading.Thread(target=wait_in_thread, name="vramd-async-wait", daemon=True).start()
    try:
        return await future
    except BaseException:
        pending.cancel()
        raise


async def release_async(reservation: Reservation) -> None:
    """Releases ``reservation`` from asyncio code: the round trip to the
    daemon runs in the loop's default executor."""
    await asyncio.get_running_loop().run_in_executor(None, reservation.release)


async def _enter(reservation: Reservation) -> Reservation:
    """``Reservation.__aenter__``: the reservation itself."""
    return reservation
