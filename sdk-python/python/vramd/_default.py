"""The module-level default client behind ``vramd.reserve()``,
``vramd.reserve_async()`` and ``vramd.status()``.

It connects on first use to :func:`~vramd.default_socket_path`, and is
replaced by a fresh connection when that path changes (``VRAMD_SOCKET`` was
set), when it was closed, in a child process after ``fork()`` (a child never
uses its parent's connection), and when the daemon restarted since it
connected (a request that could not even be sent is sent again once on the
new connection; one already sent is never silently repeated).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, TypeVar, Union

from ._errors import Disconnected
from ._vramd import Client, Pending, default_socket_path

__all__ = ["default_client", "submit", "status"]

_lock = threading.Lock()
_client: Optional[Client] = None
_pid = os.getpid()

T = TypeVar("T")


def default_client() -> Client:
    """The default client, connected to :func:`~vramd.default_socket_path`
    (opened on first use; see the module docs for when it is replaced)."""
    global _client, _pid
    path = default_socket_path()
    with _lock:
        client = _client
        if client is None or client.closed or client.socket != path or _pid != os.getpid():
            client = Client(path)
            _client, _pid = client, os.getpid()
        return client


def _forget(client: Client) -> None:
    global _client
    with _lock:
        if _client is client:
            _client = None
    client.close()


def _with_reconnect(call: Callable[[Client], T]) -> T:
    client = default_client()
    try:
        return call(client)
    except Disconnected:
        # Raised before anything reached the daemon: the connection was
        # already gone (the daemon restarted). Try once on a new one.
        _forget(client)
        return call(default_client())


def submit(size: Union[int, str], **kwargs: Any) -> Pending:
    """``Client.submit`` on the default client."""
    return _with_reconnect(lambda c: c.submit(size, **kwargs))


def status() -> dict[str, Any]:
    """``Client.status`` on the default client."""
    return _with_reconnect(lambda c: c.status())


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork(); the child has only
    # this thread, so start over. The parent's client is left alone: dropping
    # it in the child does not touch the parent's connection.
    global _lock, _client
    _lock = threading.Lock()
    _client = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
