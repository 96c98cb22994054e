"""vramd: reserve GPU memory before you load a model.

vramd is a per-machine GPU memory arbiter. Ask it for a VRAM reservation
before loading a model; it grants the reservation when it fits beside
everything else on the card, queues it when it does not, and releases it when
you are done — or when your process dies::

    import vramd

    with vramd.reserve("8GiB", label="flux", priority=5, timeout=60) as r:
        print(r.id, r.device_index, r.device_uuid, r.bytes)
        load_model_on(f"cuda:{r.device_index}")

:class:`Client` holds one connection; :func:`reserve`, :func:`reserve_async`
and :func:`status` use a module-level default client (:func:`default_client`).
A reservation marked idle (``evictable=True``, :meth:`Reservation.set_idle`)
may be taken back by the daemon when a waiter needs the room; its
:meth:`Reservation.on_evict` callback unloads the model first. Every error is
a :class:`VramdError`. See docs/python.md for the whole API.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Optional, Sequence, Union

from ._errors import (
    BadRequest,
    Cancelled,
    DaemonNotRunning,
    Disconnected,
    FrameTooLarge,
    HandshakeTimeout,
    InternalError,
    LimitExceeded,
    LineTooLong,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Refused,
    TorchUnavailable,
    Unavailable,
    VersionMismatch,
    VramdError,
    WaitTimeout,
)
from ._vramd import (
    Client,
    Eviction,
    Pending,
    Reservation,
    __version__,
    default_socket_path,
    format_size,
    parse_size,
)
from . import _default, _vramd
from ._aio import ReserveAsync, wait_async
from ._default import default_client

# Eviction callbacks run on SDK threads: let the running ones return before
# the interpreter finalizes (and start no more), and forget the parent's in a
# forked child.
atexit.register(_vramd._finish_eviction_callbacks)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_vramd._after_fork_in_child)

__all__ = [
    "__version__",
    # functions
    "reserve",
    "reserve_async",
    "status",
    "default_client",
    "default_socket_path",
    "parse_size",
    "format_size",
    "wait_async",
    # classes
    "Client",
    "Reservation",
    "Pending",
    "Eviction",
    "ReserveAsync",
    # exceptions
    "VramdError",
    "DaemonNotRunning",
    "Disconnected",
    "WaitTimeout",
    "Refused",
    "Cancelled",
    "ProtocolError",
    "BadRequest",
    "VersionMismatch",
    "HandshakeTimeout",
    "FrameTooLarge",
    "LineTooLong",
    "NotFound",
    "PermissionDenied",
    "Unavailable",
    "LimitExceeded",
    "InternalError",
    "TorchUnavailable",
]


def reserve(
    size: Union[int, str],
    *,
    device: Union[None, int, str] = None,
    priority: int = 0,
    label: Optional[str] = None,
    timeout: Optional[float] = None,
    evictable: bool = False,
    for_pids: Optional[Sequence[int]] = None,
) -> Reservation:
    """Reserves VRAM through the default client and waits for the grant.

    Same arguments as :meth:`Client.reserve`: ``size`` in bytes or as
    ``"8GiB"``; ``device`` ``None``/``"any"``, an index or a UUID; higher
    ``priority`` first; ``label`` for ``vramctl status``; ``timeout`` in
    seconds (``None`` waits as long as it takes); ``evictable=True`` for a
    reservation the daemon may take back when idle (see
    :meth:`Reservation.on_evict`). Use the result as a context manager, or
    call ``release()``.
    """
    pending = _default.submit(
        size,
        device=device,
        priority=priority,
        label=label,
        timeout=timeout,
        evictable=evictable,
        for_pids=None if for_pids is None else list(for_pids),
    )
    return pending.wait()


def reserve_async(
    size: Union[int, str],
    *,
    device: Union[None, int, str] = None,
    priority: int = 0,
    label: Optional[str] = None,
    timeout: Optional[float] = None,
    evictable: bool = False,
    for_pids: Optional[Sequence[int]] = None,
) -> ReserveAsync:
    """Like :func:`reserve`, for asyncio: await the result, or use it with
    ``async with``. The default client connects (if it has not yet) when the
    request is sent."""
    return ReserveAsync(
        None,
        size,
        device=device,
        priority=priority,
        label=label,
        timeout=timeout,
        evictable=evictable,
        for_pids=None if for_pids is None else list(for_pids),
    )


def status() -> dict[str, Any]:
    """The daemon's state through the default client, with the schema of
    ``vramctl status --json``."""
    return _default.status()
