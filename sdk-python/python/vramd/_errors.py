"""Exception classes of the vramd SDK.

Every error the SDK raises is a :class:`VramdError`. Each kind of failure the
daemon reports on the wire has its own class, and classes that match a
built-in exception also inherit from it (``WaitTimeout`` is a
``TimeoutError``, ``DaemonNotRunning`` and ``Disconnected`` are
``ConnectionError``\\ s, ``PermissionDenied`` is a ``PermissionError``), so
generic handlers work too.

The native module raises these classes (it looks them up here by name).
"""

from __future__ import annotations

from typing import Optional

__all__ = [
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


class VramdError(Exception):
    """Base class of every error raised by the vramd SDK.

    ``kind`` is the daemon's wire error kind (``"timeout"``, ``"refused"``…)
    when the daemon reported the error, else ``None``. ``socket`` is the
    socket path involved, when there is one.
    """

    kind: Optional[str] = None
    socket: Optional[str] = None


class DaemonNotRunning(VramdError, ConnectionError):
    """No daemon answers on the socket path (the message and ``socket`` name
    the path tried). Start ``vramd``, or point ``VRAMD_SOCKET`` or
    ``Client(socket=...)`` at its socket."""


class Disconnected(VramdError, ConnectionError):
    """The connection to the daemon was lost (it stopped or restarted), or the
    client was closed. Every reservation the connection held is released."""


class WaitTimeout(VramdError, TimeoutError):
    """The request's wait limit (``timeout=``) passed before it fit. Wire kind
    ``timeout``."""


class Refused(VramdError):
    """The request can never be granted: larger than every eligible device,
    an unknown device, or zero bytes. Wire kind ``refused``."""


class Cancelled(VramdError):
    """The request was cancelled (``Pending.cancel()``) before it was granted."""


class ProtocolError(VramdError):
    """The daemon and the SDK do not understand each other (an unexpected
    reply, a malformed message). The subclasses are the wire kinds of this
    family."""


class BadRequest(ProtocolError):
    """The daemon could not decode a message or it made no sense. Wire kind
    ``bad_request``."""


class VersionMismatch(ProtocolError):
    """The daemon speaks another protocol version than this SDK. Wire kind
    ``version_mismatch``."""


class HandshakeTimeout(ProtocolError):
    """The session's handshake did not complete in time. Wire kind
    ``handshake_timeout``."""


class FrameTooLarge(ProtocolError):
    """A message was larger than the daemon accepts; the connection is
    closed. Wire kind ``frame_too_large``."""


class LineTooLong(ProtocolError):
    """A JSON line was longer than the daemon accepts. Wire kind
    ``line_too_long``."""


class NotFound(VramdError):
    """No such reservation, request or device. Wire kind ``not_found``."""


class PermissionDenied(VramdError, PermissionError):
    """The daemon does not allow this client to do that. Wire kind
    ``permission_denied``."""


class Unavailable(VramdError):
    """The daemon cannot serve the request now (shutting down, device
    unhealthy). Wire kind ``unavailable``."""


class LimitExceeded(VramdError):
    """This client or user has too many requests or connections open. Wire
    kind ``limit_exceeded``."""


class InternalError(VramdError):
    """A bug in the daemon. Wire kind ``internal``."""


class TorchUnavailable(VramdError):
    """``Reservation.apply_torch_limit()`` needs PyTorch with a CUDA device,
    and PyTorch is not installed or sees none."""
