"""The exception hierarchy and which errors the SDK raises when."""

from __future__ import annotations

import pytest
import vramd

from helpers import WAIT, Daemon, wait_until

WIRE_KINDS = {
    "bad_request": vramd.BadRequest,
    "version_mismatch": vramd.VersionMismatch,
    "handshake_timeout": vramd.HandshakeTimeout,
    "frame_too_large": vramd.FrameTooLarge,
    "line_too_long": vramd.LineTooLong,
    "timeout": vramd.WaitTimeout,
    "refused": vramd.Refused,
    "not_found": vramd.NotFound,
    "permission_denied": vramd.PermissionDenied,
    "unavailable": vramd.Unavailable,
    "limit_exceeded": vramd.LimitExceeded,
    "internal": vramd.InternalError,
}


def test_every_error_class_is_a_vramd_error():
    classes = [getattr(vramd, name) for name in vramd.__all__ if name[:1].isupper()]
    errors = [c for c in classes if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(errors) == 18
    for cls in errors:
        assert issubclass(cls, vramd.VramdError), cls
        assert cls.__doc__, cls
        assert cls.__module__ == "vramd._errors"
    assert issubclass(vramd.VramdError, Exception)
    assert issubclass(vramd.WaitTimeout, TimeoutError)
    assert issubclass(vramd.DaemonNotRunning, ConnectionError)
    assert issubclass(vramd.Disconnected, ConnectionError)
    assert issubclass(vramd.PermissionDenied, PermissionError)
    for cls in (vramd.BadRequest, vramd.VersionMismatch, vramd.HandshakeTimeout):
        assert issubclass(cls, vramd.ProtocolError)
    distinct = {vramd.WaitTimeout, vramd.Refused, vramd.DaemonNotRunning, vramd.Disconnected}
    assert len(distinct) == 4


@pytest.mark.parametrize(("kind", "cls"), sorted(WIRE_KINDS.items()))
def test_each_wire_kind_has_its_class(kind, cls):
    err = vramd._vramd._error_for_wire_kind(kind, "explanation")
    assert type(err) is cls
    assert err.kind == kind
    assert "explanation" in str(err)


def test_unknown_wire_kind():
    with pytest.raises(ValueError):
        vramd._vramd._error_for_wire_kind("no_such_kind", "x")


def test_daemon_not_running_names_the_socket(tmp_path):
    path = str(tmp_path / "nobody-listens.sock")
    with pytest.raises(vramd.DaemonNotRunning) as info:
        vramd.Client(path)
    assert path in str(info.value)
    assert info.value.socket == path
    assert info.value.kind is None
    assert isinstance(info.value, ConnectionError)


def test_refused_when_it_can_never_fit(daemon):
    c = daemon.client()
    with pytest.raises(vramd.Refused) as info:
        c.reserve("100GiB")
    assert info.value.kind == "refused"
    with pytest.raises(vramd.Refused):
        c.reserve("1GiB", device=7)
    with pytest.raises(vramd.Refused):
        c.reserve(0)
    assert daemon.status()["counters"]["refusals"] == 3
    c.ping()


def test_disconnected_when_the_daemon_dies_during_a_wait(daemon):
    holder = daemon.client().reserve("20GiB")
    # The daemon does not come back: Disconnected once the client's
    # reconnect window (shortened here from its 60 s) has passed.
    c = vramd.Client(daemon.socket, reconnect=0.5)
    p = c.submit("10GiB")
    assert wait_until(lambda: daemon.queue_len() == 1)
    daemon.kill()
    with pytest.raises(vramd.Disconnected) as info:
        p.poll(WAIT)
    assert daemon.socket in str(info.value)
    assert info.value.socket == daemon.socket
    # Releasing after the connection is gone is not an error: it was released then.
    holder.release()
    with pytest.raises(vramd.Disconnected):
        c.reserve("1GiB", timeout=WAIT)
    with pytest.raises(vramd.Disconnected):
        c.status()


def test_wait_timeout_message(daemon):
    c = daemon.client()
    with c.reserve("20GiB"):
        with pytest.raises(vramd.WaitTimeout, match="timed out"):
            c.reserve("10GiB", timeout=0.1)
