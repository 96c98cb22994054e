"""Fixtures of the vramd Python SDK tests (see helpers.py)."""

from __future__ import annotations

import signal
from typing import Iterator, List

import pytest

from helpers import Daemon


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "daemon_args(*args): extra command-line arguments for the daemon the "
        "`daemon` and `two_devices` fixtures start",
    )


def _daemon_args(request: pytest.FixtureRequest) -> List[str]:
    """The arguments of the closest ``daemon_args`` marker: the test's own,
    else its class's, else its module's ``pytestmark``."""
    marker = request.node.get_closest_marker("daemon_args")
    return [str(a) for a in marker.args] if marker else []


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon with one simulated 24 GiB device. Mark a test (or a module,
    with ``pytestmark``) ``@pytest.mark.daemon_args("--min-residency", "0s")``
    to pass the daemon more arguments."""
    d = Daemon("24GiB", extra_args=_daemon_args(request))
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def two_devices(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon with two simulated devices: 24 GiB and 8 GiB (more arguments
    as for ``daemon``)."""
    d = Daemon("24GiB", "8GiB", extra_args=_daemon_args(request))
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
