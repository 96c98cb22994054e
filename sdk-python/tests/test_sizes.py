"""Argument parsing: sizes, devices, wait limits."""

from __future__ import annotations

import pytest
import vramd

from helpers import GIB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GIB),
        ("512MiB", 512 << 20),
        ("8GB", 8_000_000_000),
        ("1.5GiB", 3 * GIB // 2),
        ("4096B", 4096),
        ("8Gi", 8 * GIB),
        ("512Mi", 512 << 20),
        ("2 gib", 2 * GIB),
        ("1KiB", 1024),
        ("1kb", 1000),
        ("1TiB", 1 << 40),
    ],
)
def test_parse_size(text, expected):
    assert vramd.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "1.2.3GiB", "-1GiB", "lots"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        vramd.parse_size(text)


@pytest.mark.parametrize(("text", "hint"), [("8", "8GiB"), ("4096", "4096GiB")])
def test_a_string_without_a_unit_is_refused_with_a_hint(text, hint):
    with pytest.raises(ValueError, match=f"did you mean {hint}\\?"):
        vramd.parse_size(text)


def test_an_int_stays_bytes(daemon):
    with daemon.client().reserve(4096) as r:
        assert r.bytes == 4096


def test_format_size():
    assert vramd.format_size(8 * GIB) == "8.00 GiB"
    assert vramd.parse_size(vramd.format_size(8 * GIB).replace(" ", "")) == 8 * GIB


def test_reserve_rejects_bad_arguments_before_sending(daemon):
    c = daemon.client()
    with pytest.raises(ValueError, match="invalid size"):
        c.reserve("8 apples")
    with pytest.raises(ValueError, match="at least 0"):
        c.reserve(-1)
    with pytest.raises(TypeError):
        c.reserve(1.5)
    with pytest.raises(TypeError):
        c.reserve(True)
    with pytest.raises(ValueError, match="invalid device"):
        c.reserve("1GiB", device="gpu zero")
    with pytest.raises(ValueError, match="invalid device index"):
        c.reserve("1GiB", device=-1)
    with pytest.raises(TypeError):
        c.reserve("1GiB", device=1.0)
    with pytest.raises(ValueError, match="timeout"):
        c.reserve("1GiB", timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        c.reserve("1GiB", timeout=float("nan"))
    with pytest.raises(TypeError):
        c.reserve("1GiB", 0)  # device and the rest are keyword-only
    with pytest.raises(ValueError):
        c.reserve_async("8 apples")
    assert daemon.status()["counters"]["grants"] == 0
    assert daemon.status()["queue"] == []


def test_infinite_timeout_means_no_limit(daemon):
    with daemon.client().reserve("1GiB", timeout=float("inf")) as r:
        assert r.bytes == GIB
