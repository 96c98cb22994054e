"""A daemon restart loses no reservation: the client reconnects and
reclaims it by itself (the Rust client underneath does), and a newcomer
does not get its room meanwhile. Every wait is bounded."""

from __future__ import annotations

import signal
import tempfile
import os

import pytest

import vramd
from helpers import GIB, WAIT, Daemon, wait_until


def _stop(d: Daemon) -> None:
    """SIGTERM (the daemon saves its reservations), bounded wait."""
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=WAIT) == 0, d.log()


def test_a_reservation_survives_a_daemon_restart() -> None:
    sockdir = tempfile.mkdtemp(prefix="vramd-py-restart-")
    sock = os.path.join(sockdir, "vramd.sock")
    d1 = Daemon("24GiB", socket_path=sock, extra_args=["--grace", "20s"])
    d2 = None
    try:
        client = vramd.Client(sock)
        r = client.reserve("16GiB", label="kept")
        rid = r.id
        _stop(d1)
        d2 = Daemon("24GiB", socket_path=sock, extra_args=["--grace", "20s"])
        # The room is still the holder's during the grace period.
        with vramd.Client(sock) as newcomer:
            with pytest.raises(vramd.WaitTimeout):
                newcomer.reserve("16GiB", timeout=0)
        assert wait_until(lambda: "reclaimed after restart" in d2.log()), d2.log()
        assert r.lost is None
        status = client.status()
        kept = [x for x in status["reservations"] if x["id"] == rid]
        assert kept and kept[0]["bytes"] == 16 * GIB and kept[0]["label"] == "kept", status
        r.set_idle(False)  # the reclaimed reservation is this client's again
        r.release()
        assert wait_until(lambda: d2.status()["reservations"] == [])
        client.close()
    finally:
        d1.stop()
        if d2 is not None:
            d2.stop()
