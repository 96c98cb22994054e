"""After fork(), a child never releases its parent's reservations.

What a child sees: the Reservation objects it inherited still show their id,
device and bytes; ``release()``, leaving a ``with`` block and garbage
collection do nothing (the reservation is the parent's); the parent's Client
raises ``VramdError`` when used (the child must open its own); closing or
dropping it leaves the parent's connection alone; the default client opens a
new connection in the child.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import pytest
import vramd

from helpers import WAIT, finish, python_child, read_line, wait_child, wait_until

# These tests fork on purpose, with the SDK's reader threads running.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def _child(body) -> None:
    """Runs ``body`` in this forked child and exits: 0 if it passed, 1 with
    the traceback on stderr if not."""
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def test_child_does_not_release_the_parents_reservation(daemon):
    c = daemon.client()
    r = c.reserve("4GiB", label="parent")

    def child():
        assert (r.id, r.bytes, r.label) == (r.id, 4 << 30, "parent")
        r.release()  # does nothing in the child
        assert not r.released
        with pytest.raises(vramd.VramdError, match="fork"):
            r.attach_pids([os.getpid()])
        with r:
            pass
        c.close()  # leaves the parent's connection alone
        assert not r.released
        gc.collect()

    pid = os.fork()
    if pid == 0:
        _child(child)
    assert wait_child(pid) == 0
    status = daemon.status()
    assert [x["id"] for x in status["reservations"]] == [r.id]
    c.ping()  # the parent's connection is intact
    r.release()
    assert daemon.reservation_ids() == []


def test_child_dropping_inherited_objects_changes_nothing(daemon):
    c = daemon.client()
    r = c.reserve("20GiB")
    p = c.submit("10GiB")  # waits behind r
    assert wait_until(lambda: daemon.queue_len() == 1)

    def child():
        nonlocal r, c, p
        del r, c, p
        gc.collect()

    pid = os.fork()
    if pid == 0:
        _child(child)
    assert wait_child(pid) == 0
    # Neither the reservation nor the waiting request was touched.
    assert daemon.reservation_ids() == [r.id]
    assert daemon.queue_len() == 1
    r.release()
    granted = p.poll(WAIT)
    assert granted is not None
    assert daemon.reservation_ids() == [granted.id]


def test_parents_client_raises_in_the_child_and_the_child_opens_its_own(daemon, monkeypatch):
    monkeypatch.setenv("VRAMD_SOCKET", daemon.socket)
    parent_default = vramd.default_client()
    c = daemon.client()

    def child():
        for client in (c, parent_default):
            try:
                client.status()
            except vramd.VramdError as e:
                assert "fork" in str(e), e
            else:
                raise AssertionError("the parent's client worked in the child")
        mine = vramd.default_client()
        assert mine is not parent_default
        with vramd.reserve("1GiB", label="child") as own:
            labels = [x["label"] for x in vramd.status()["reservations"]]
            assert labels == ["child"], labels
        assert own.released

    pid = os.fork()
    if pid == 0:
        _child(child)
    assert wait_child(pid) == 0
    assert vramd.default_client() is parent_default
    c.ping()
    parent_default.ping()


CHILD_EXITS_NORMALLY = """
import gc, json, os, sys, vramd
c = vramd.Client(sys.argv[1])
r = c.reserve("4GiB", label="parent")
pid = os.fork()
if pid == 0:
    # A child that runs to the end: interpreter shutdown finalizes everything.
    r.release()
    del r
    gc.collect()
    sys.exit(0)
_, status = os.waitpid(pid, 0)
held = [x["id"] for x in c.status()["reservations"]]
print(json.dumps({"child": os.WEXITSTATUS(status), "held": held, "mine": r.id}), flush=True)
"""


def test_child_that_exits_normally_keeps_the_parents_reservation(daemon):
    proc = python_child(CHILD_EXITS_NORMALLY, daemon.socket)
    try:
        out = json.loads(read_line(proc))
        assert out["child"] == 0
        assert out["held"] == [out["mine"]]
        assert proc.wait(WAIT) == 0
    finally:
        finish(proc)
