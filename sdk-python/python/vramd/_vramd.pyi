"""Type stubs of the native module ``vramd._vramd`` (import ``vramd`` instead)."""

from __future__ import annotations

from os import PathLike
from types import TracebackType
from typing import Any, Callable, Coroutine, Optional, Sequence, Type, TypeVar, Union

from ._aio import ReserveAsync
from ._errors import VramdError

__version__: str
SLICE_SECONDS: float

Size = Union[int, str]
Device = Union[None, int, str]
_EvictCallback = TypeVar("_EvictCallback", bound=Callable[["Eviction"], object])

def parse_size(size: str) -> int:
    """Parses ``"8GiB"``, ``"8Gi"``, ``"512MiB"``, ``"1.5GiB"``, ``"8GB"`` or
    ``"4096B"`` into bytes; raises ``ValueError`` otherwise, with a hint for a
    number without a unit (``"8"``: "did you mean 8GiB?")."""

def format_size(bytes: int) -> str:
    """Formats bytes for people, e.g. ``"8.00 GiB"``."""

def default_socket_path() -> str:
    """The socket a ``Client()`` without arguments connects to."""

def _error_for_wire_kind(kind: str, message: str) -> VramdError:
    """The exception raised for a daemon error of wire kind ``kind``."""

def _finish_eviction_callbacks() -> None:
    """At exit: starts no more eviction callbacks and waits for the running
    ones, each at most until its deadline."""

def _after_fork_in_child() -> None:
    """In a forked child: forgets the parent's running eviction callbacks."""

class Client:
    """A connection to the vramd daemon; closing it releases everything
    reserved through it."""

    def __init__(
        self,
        socket: Union[None, str, PathLike[str]] = None,
        *,
        reconnect: Optional[float] = 60.0,
    ) -> None:
        """Connects; raises ``DaemonNotRunning`` when nothing listens.
        ``reconnect``: seconds to try to reach the daemon again (and reclaim
        what the client holds) when the connection closes under it; ``None``:
        never."""
    def reserve(
        self,
        size: Size,
        *,
        device: Device = None,
        priority: int = 0,
        label: Optional[str] = None,
        timeout: Optional[float] = None,
        evictable: bool = False,
        for_pids: Optional[Sequence[int]] = None,
    ) -> Reservation:
        """Reserves ``size`` and waits for the grant (GIL released; Ctrl-C
        withdraws the request). ``evictable=True`` makes it idle from the
        start: the daemon may take it back when a waiter needs the room."""
    def submit(
        self,
        size: Size,
        *,
        device: Device = None,
        priority: int = 0,
        label: Optional[str] = None,
        timeout: Optional[float] = None,
        evictable: bool = False,
        for_pids: Optional[Sequence[int]] = None,
    ) -> Pending:
        """Sends a request and returns at once."""
    def reserve_async(
        self,
        size: Size,
        *,
        device: Device = None,
        priority: int = 0,
        label: Optional[str] = None,
        timeout: Optional[float] = None,
        evictable: bool = False,
        for_pids: Optional[Sequence[int]] = None,
    ) -> ReserveAsync:
        """Reserves from asyncio: await it or use ``async with``."""
    def status(self) -> dict[str, Any]:
        """The daemon's state, with the schema of ``vramctl status --json``."""
    def ping(self) -> None:
        """Round trip to the daemon."""
    def close(self) -> None:
        """Closes the connection, releasing every reservation made through it."""
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    @property
    def socket(self) -> str:
        """The socket path this client is connected to."""
    @property
    def daemon_version(self) -> str:
        """The daemon's program version."""
    def __enter__(self) -> Client: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Reservation:
    """A granted VRAM reservation; released on ``release()``, on leaving a
    ``with`` block, on garbage collection, and when the process dies."""

    @property
    def id(self) -> int:
        """Its id, as ``vramctl status`` shows it."""
    @property
    def device_index(self) -> int:
        """Index of its device, as ``nvidia-smi`` numbers devices."""
    @property
    def device_uuid(self) -> str:
        """UUID of its device."""
    @property
    def bytes(self) -> int:
        """Bytes reserved (as granted, or as last resized)."""
    @property
    def label(self) -> Optional[str]:
        """The label it was requested with."""
    @property
    def priority(self) -> int:
        """The priority it was requested with."""
    @property
    def client(self) -> Client:
        """The client it was made through."""
    @property
    def released(self) -> bool:
        """Whether it was released in this process, its client closed, or it
        was evicted."""
    @property
    def evicted(self) -> bool:
        """Whether the daemon took it back: its eviction callback returned and
        it is released."""
    @property
    def lost(self) -> str | None:
        """Why it was lost (the daemon went away and it could not be
        reclaimed), or ``None``. A daemon restart alone loses nothing."""
    def release(self) -> None:
        """Releases it; idempotent; a no-op after an eviction and in a forked
        child."""
    def set_idle(self, idle: bool = True) -> None:
        """Marks it idle (the daemon may evict it when a waiter needs the
        room) or busy (``False``: never evicted); waits for the daemon's
        answer with the GIL released. Raises ``NotFound`` once evicted."""
    def on_evict(self, callback: _EvictCallback) -> _EvictCallback:
        """Sets ``callback(eviction)``, run on an SDK thread when the daemon
        asks for the reservation back; it should unload the model, and the
        reservation is released when it returns (an exception goes to
        ``sys.unraisablehook``). Returns ``callback``: usable as a decorator."""
    def attach_pids(self, pids: Sequence[int]) -> list[int]:
        """Declares more processes whose GPU usage counts against it; returns
        every pid it now speaks for."""
    def resize(self, size: Size) -> None:
        """Changes its size: shrinks, or grows into room there is now (its
        processes' own usage costs nothing); else raises ``WaitTimeout`` and
        keeps its size. Never waits."""
    def apply_torch_limit(self, device: Any = None) -> float:
        """Caps PyTorch's caching allocator on its device to its bytes;
        returns the fraction set."""
    def __enter__(self) -> Reservation: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def __aenter__(self) -> Coroutine[Any, Any, Reservation]: ...
    def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Coroutine[Any, Any, None]: ...

class Eviction:
    """The daemon's request to give a reservation back, as an eviction
    callback receives it."""

    def __init__(self, id: int, deadline: float, reason: str) -> None:
        """Builds one by hand, e.g. to test a callback without a daemon."""
    @property
    def id(self) -> int:
        """The id of the reservation the daemon wants back."""
    @property
    def deadline(self) -> float:
        """Seconds the holder has to unload before the daemon asks someone
        else."""
    @property
    def reason(self) -> str:
        """Who needs the room, in words."""

class Pending:
    """A request sent and not yet granted; dropping it withdraws it."""

    def poll(self, timeout: Optional[float] = 0.0) -> Optional[Reservation]:
        """Waits up to ``timeout`` seconds; the reservation, or ``None``."""
    def wait(self) -> Reservation:
        """Waits for the grant."""
    def cancel(self) -> None:
        """Withdraws the request; never blocks."""
    @property
    def id(self) -> Optional[int]:
        """The id the daemon gave it, once queued or granted."""
    @property
    def position(self) -> Optional[int]:
        """Last known queue position (1 is next)."""
    @property
    def bytes(self) -> int:
        """Bytes requested."""
    @property
    def done(self) -> bool:
        """Whether it was granted, failed or cancelled."""
    @property
    def cancelled(self) -> bool:
        """Whether it was cancelled."""
    @property
    def client(self) -> Client:
        """The client it was sent through."""
