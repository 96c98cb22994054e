"""PyTorch helper: cap the CUDA caching allocator to a reservation.

``Reservation.apply_torch_limit()`` calls :func:`apply_torch_limit`. It sets
``torch.cuda.set_per_process_memory_fraction(bytes / total, device)`` so that
a cooperative PyTorch program gets an out-of-memory error from its own
allocator instead of silently growing past what it reserved.

Which torch device: vramd numbers devices as ``nvidia-smi`` does, and PyTorch
numbers the devices ``CUDA_VISIBLE_DEVICES`` leaves visible, in
``CUDA_DEVICE_ORDER``. So the device is found by UUID when PyTorch reports
device UUIDs; otherwise (an older PyTorch, or a simulated device) the
reservation's ``device_index`` is used. ``device=`` overrides both.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Protocol

from ._errors import TorchUnavailable, VramdError

__all__ = ["apply_torch_limit"]


class _ReservationLike(Protocol):
    @property
    def bytes(self) -> int: ...
    @property
    def device_index(self) -> int: ...
    @property
    def device_uuid(self) -> str: ...
    @property
    def released(self) -> bool: ...
    @property
    def id(self) -> int: ...


def apply_torch_limit(reservation: _ReservationLike, device: Any = None) -> float:
    """Caps PyTorch's caching allocator on the reservation's device to the
    reservation's bytes; returns the fraction of the device's memory set.

    Raises :class:`~vramd.TorchUnavailable` when PyTorch is not installed or
    sees no CUDA device, and :class:`~vramd.VramdError` when the reservation
    is released or its device is not visible to PyTorch.
    """
    if reservation.released:
        raise VramdError(
            f"reservation {reservation.id} is released; there is nothing to cap PyTorch to"
        )
    try:
        torch = importlib.import_module("torch")  # an optional dependency
    except ImportError as e:
        raise TorchUnavailable(
            "Reservation.apply_torch_limit() needs PyTorch, which is not installed "
            "in this environment (pip install torch)"
        ) from e
    cuda = torch.cuda
    if not cuda.is_available():
        raise TorchUnavailable(
            "PyTorch sees no CUDA device (torch.cuda.is_available() is False), "
            "so there is no allocator to cap"
        )
    index = _torch_index(torch, reservation, device)
    total = int(cuda.get_device_properties(index).total_memory)
    if total <= 0:
        raise VramdError(f"PyTorch reports {total} bytes of memory on cuda:{index}")
    fraction = min(1.0, reservation.bytes / total)
    cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _torch_index(torch: Any, reservation: _ReservationLike, device: Any) -> int:
    cuda = torch.cuda
    count = int(cuda.device_count())
    if device is not None:
        index = _explicit_index(cuda, device)
    else:
        found, uuids_reported = _index_by_uuid(cuda, count, reservation.device_uuid)
        if found is not None:
            index = found
        elif uuids_reported and _cuda_uuid(reservation.device_uuid) is not None:
            raise VramdError(
                f"the reservation's device {reservation.device_uuid} is not visible to "
                f"PyTorch (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                "pass apply_torch_limit(device=...) to name the torch device"
            )
        else:
            index = reservation.device_index
    if not 0 <= index < count:
        raise VramdError(
            f"PyTorch sees {count} CUDA device(s), so cuda:{index} does not exist "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "pass apply_torch_limit(device=...) to name the torch device"
        )
    return index


def _explicit_index(cuda: Any, device: Any) -> int:
    """A torch device index from an int, ``"cuda:N"``, ``"cuda"`` or a
    ``torch.device``."""
    if isinstance(device, bool):
        raise TypeError("device must be an index, 'cuda:N' or a torch.device, not a bool")
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        text = device.strip()
        if text == "cuda":
            return int(cuda.current_device())
        if text.startswith("cuda:"):
            text = text[len("cuda:") :]
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"invalid torch device {device!r}: use an index or 'cuda:N'") from None
    if getattr(device, "type", None) == "cuda":
        index = getattr(device, "index", None)
        return int(cuda.current_device()) if index is None else int(index)
    raise TypeError(f"device must be an index, 'cuda:N' or a CUDA torch.device, not {device!r}")


def _cuda_uuid(uuid: str) -> Optional[str]:
    """The bare, lower-case UUID of a ``GPU-…`` or ``MIG-…`` device name, or
    ``None`` for anything else (such as a simulated ``SIM-0``)."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return None


def _index_by_uuid(cuda: Any, count: int, uuid: str) -> tuple[Optional[int], bool]:
    """(index of the torch device with this UUID or None, whether PyTorch
    reports UUIDs at all)."""
    want = _cuda_uuid(uuid)
    reported = False
    for i in range(count):
        got = getattr(cuda.get_device_properties(i), "uuid", None)
        if got is None:
            continue
        reported = True
        text = str(got).strip().lower()
        bare = _cuda_uuid(text) or text
        if want is not None and bare == want:
            return i, True
    return None, reported
