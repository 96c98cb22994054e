"""Reservation.apply_torch_limit(): against a stand-in `torch` module, and
against real PyTorch where it is installed."""

from __future__ import annotations

import sys
import types

import pytest
import vramd
from vramd import _torch

from helpers import GIB


class FakeCuda:
    """The part of torch.cuda that apply_torch_limit uses."""

    def __init__(self, totals, uuids=None, available=True):
        self.totals = totals
        self.uuids = uuids
        self.available = available
        self.calls = []

    def is_available(self):
        return self.available

    def device_count(self):
        return len(self.totals)

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        props = types.SimpleNamespace(total_memory=self.totals[index], name="Fake GPU")
        if self.uuids is not None:
            props.uuid = self.uuids[index]
        return props

    def set_per_process_memory_fraction(self, fraction, device=None):
        assert 0.0 <= fraction <= 1.0
        self.calls.append((fraction, device))


@pytest.fixture
def fake_torch(monkeypatch):
    def install(*args, **kwargs):
        cuda = FakeCuda(*args, **kwargs)
        module = types.ModuleType("torch")
        module.cuda = cuda
        monkeypatch.setitem(sys.modules, "torch", module)
        return cuda

    return install


def fake_reservation(bytes_, index=0, uuid="SIM-0", released=False):
    return types.SimpleNamespace(
        bytes=bytes_, device_index=index, device_uuid=uuid, released=released, id=7
    )


def test_caps_the_allocator_to_the_reservation(daemon, fake_torch):
    cuda = fake_torch([24 * GIB])
    with daemon.client().reserve("6GiB") as r:
        assert r.apply_torch_limit() == 0.25
    assert cuda.calls == [(0.25, 0)]


def test_uses_the_reservations_device_index(two_devices, fake_torch):
    cuda = fake_torch([24 * GIB, 8 * GIB])
    with two_devices.client().reserve("2GiB", device=1) as r:
        assert r.apply_torch_limit() == 0.25
    assert cuda.calls == [(0.25, 1)]


def test_explicit_device(daemon, fake_torch):
    cuda = fake_torch([24 * GIB, 12 * GIB])
    with daemon.client().reserve("6GiB") as r:
        assert r.apply_torch_limit(device=1) == 0.5
        assert r.apply_torch_limit(device="cuda:1") == 0.5
        assert r.apply_torch_limit(device=types.SimpleNamespace(type="cuda", index=0)) == 0.25
        with pytest.raises(ValueError):
            r.apply_torch_limit(device="cuda:x")
        with pytest.raises(vramd.VramdError, match="does not exist"):
            r.apply_torch_limit(device=5)
    assert cuda.calls == [(0.5, 1), (0.5, 1), (0.25, 0)]


def test_device_found_by_uuid_whatever_the_numbering(fake_torch):
    cuda = fake_torch([24 * GIB, 48 * GIB], uuids=["aaaa-1111", "bbbb-2222"])
    # vramd's device 0 is torch's cuda:1 (e.g. CUDA_VISIBLE_DEVICES reorders).
    r = fake_reservation(12 * GIB, index=0, uuid="GPU-BBBB-2222")
    assert _torch.apply_torch_limit(r) == 0.25
    assert cuda.calls == [(0.25, 1)]


def test_device_not_visible_to_torch(fake_torch):
    fake_torch([24 * GIB], uuids=["aaaa-1111"])
    r = fake_reservation(12 * GIB, index=0, uuid="GPU-cccc-3333")
    with pytest.raises(vramd.VramdError, match="not visible to PyTorch"):
        _torch.apply_torch_limit(r)


def test_fraction_is_at_most_one(fake_torch):
    cuda = fake_torch([8 * GIB])
    assert _torch.apply_torch_limit(fake_reservation(16 * GIB)) == 1.0
    assert cuda.calls == [(1.0, 0)]


def test_released_reservation(daemon, fake_torch):
    fake_torch([24 * GIB])
    r = daemon.client().reserve("1GiB")
    r.release()
    with pytest.raises(vramd.VramdError, match="released"):
        r.apply_torch_limit()


def test_torch_not_installed(daemon, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with daemon.client().reserve("1GiB") as r:
        with pytest.raises(vramd.TorchUnavailable, match="not installed") as info:
            r.apply_torch_limit()
    assert isinstance(info.value.__cause__, ImportError)


def test_torch_without_cuda(daemon, fake_torch):
    fake_torch([24 * GIB], available=False)
    with daemon.client().reserve("1GiB") as r:
        with pytest.raises(vramd.TorchUnavailable, match="no CUDA device"):
            r.apply_torch_limit()


def test_real_torch(daemon):
    torch = pytest.importorskip("torch")
    with daemon.client().reserve("1GiB") as r:
        if not torch.cuda.is_available():
            with pytest.raises(vramd.TorchUnavailable):
                r.apply_torch_limit()
            return
        index = min(r.device_index, torch.cuda.device_count() - 1)
        fraction = r.apply_torch_limit(device=index)
        total = torch.cuda.get_device_properties(index).total_memory
        assert fraction == pytest.approx(min(1.0, GIB / total))
        # Allocating past the cap now fails in PyTorch's own allocator.
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(2 * GIB, dtype=torch.uint8, device=f"cuda:{index}")
