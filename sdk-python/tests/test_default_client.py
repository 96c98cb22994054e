"""The module-level API: vramd.reserve(), vramd.status() and the default
client behind them."""

from __future__ import annotations

import pytest
import vramd

from helpers import GIB, Daemon


def test_module_level_reserve_and_status(daemon, monkeypatch):
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
    assert vramd.default_socket_path() == daemon.socket
    with vramd.reserve("8GiB", label="flux", priority=5, timeout=60) as r:
        assert (r.bytes, r.label, r.priority) == (8 * GIB, "flux", 5)
        assert r.client is vramd.default_client()
        assert [x["id"] for x in vramd.status()["reservations"]] == [r.id]
    assert vramd.status()["reservations"] == []
    assert vramd.default_client().socket == daemon.socket


def test_default_client_follows_the_socket_path(daemon, monkeypatch):
    other = Daemon("8GiB")
    try:
        monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
        first = vramd.default_client()
        assert vramd.default_client() is first
        monkeypatch.setenv("VRAMD_SOCKET", other.socket)
        second = vramd.default_client()
        assert second is not first and second.socket == other.socket
        assert vramd.status()["devices"][0]["total_bytes"] == 8 * GIB
    finally:
        other.stop()


def test_default_client_reconnects_after_a_daemon_restart(daemon, monkeypatch):
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
    before = vramd.default_client()
    vramd.status()
    daemon.kill()
    restarted = Daemon("24GiB", socket_path=daemon.socket)
    try:
        assert vramd.status()["reservations"] == []
        with vramd.reserve("1GiB") as r:
            assert r.client is not before
    finally:
        restarted.stop()


def test_default_client_is_replaced_when_closed(daemon, monkeypatch):
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
    first = vramd.default_client()
    first.close()
    assert vramd.default_client() is not first
    vramd.status()


def test_module_level_errors(tmp_path, monkeypatch):
    path = str(tmp_path / "none.sock")
    monkeypatch.setenv("VRAMD_SOCKET", path)
    with pytest.raises(vramd.DaemonNotRunning, match="none.sock"):
        vramd.reserve("1GiB")
    with pytest.raises(vramd.DaemonNotRunning):
        vramd.status()


def test_public_names_are_documented():
    for name in vramd.__all__:
        obj = getattr(vramd, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj
            continue
        assert obj.__doc__ and obj.__doc__.strip(), name
    for cls in (
        vramd.Client,
        vramd.Reservation,
        vramd.Pending,
        vramd.ReserveAsync,
        vramd.Eviction,
    ):
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            assert getattr(value, "__doc__", None), f"{cls.__name__}.{attr}"
