"""Fixtures of the vramd Python SDK tests (see helpers.py)."""

from __future__ import annotations

import signal
from typing import Iterator

import pytest

from helpers import Daemon


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A daemon with one simulated 24 GiB device."""
    d = Daemon("24GiB")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def two_devices() -> Iterator[Daemon]:
    """A daemon with two simulated devices: 24 GiB and 8 GiB."""
    d = Daemon("24GiB", "8GiB")
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
