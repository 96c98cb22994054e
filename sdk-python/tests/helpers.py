"""Shared helpers of the vramd Python SDK tests: start the real daemon on a
temporary socket, run Python in a subprocess, wait with a bound."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import vramd

SDK_DIR = Path(__file__).resolve().parents[1]
VRAMD_BIN = Path(os.environ.get("VRAMD_BIN", str(SDK_DIR.parent / "target" / "debug" / "vramd")))
VRAMCTL_BIN = VRAMD_BIN.with_name("vramctl")

# Longest any single wait in a test may take.
WAIT = 10.0
GIB = 1 << 30


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.01) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class ReserveThread(threading.Thread):
    """``client.reserve(size, timeout=WAIT)`` on a thread of its own, started
    at once: ``reservation`` is what it returned and ``error`` what it raised
    instead, both ``None`` while it waits."""

    def __init__(self, client: vramd.Client, size: str) -> None:
        super().__init__()
        self._client = client
        self._size = size
        self.reservation: Optional[vramd.Reservation] = None
        self.error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        try:
            self.reservation = self._client.reserve(self._size, timeout=WAIT)
        except BaseException as e:  # reported by the test
            self.error = e


class Daemon:
    """A running ``vramd --simulate ...`` on a temporary socket;
    ``extra_args`` go to the daemon's command line as they are (e.g.
    ``["--min-residency", "0s"]``)."""

    def __init__(
        self,
        *sizes: str,
        socket_path: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not VRAMD_BIN.exists():
            raise RuntimeError(
                f"no vramd binary at {VRAMD_BIN}: build it with `cargo build -p vramd --bins` "
                "or set VRAMD_BIN"
            )
        self.dir = tempfile.mkdtemp(prefix="vramd-py-")
        self.socket = socket_path or os.path.join(self.dir, "vramd.sock")
        self.log_path = os.path.join(self.dir, "vramd.log")
        args: List[str] = [str(VRAMD_BIN)]
        for size in sizes or ("24GiB",):
            args += ["--simulate", size]
        args += ["--socket", self.socket]
        args += list(extra_args)
        env = dict(os.environ)
        env.pop("VRAMD_SOCKET", None)
        env["RUST_LOG"] = "debug"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        if not wait_until(self._accepting):
            self.stop()
            raise RuntimeError(f"vramd did not start listening; log:\n{self.log()}")

    def _accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vramd exited with {self.proc.returncode}; log:\n{self.log()}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def client(self) -> vramd.Client:
        """A new client of this daemon."""
        return vramd.Client(self.socket)

    def status(self) -> dict:
        """The daemon's status, through a short-lived client."""
        with vramd.Client(self.socket) as c:
            return c.status()

    def queue_len(self) -> int:
        return len(self.status()["queue"])

    def reservation_ids(self) -> List[int]:
        return sorted(r["id"] for r in self.status()["reservations"])

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILLs the daemon and waits for it to exit."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def python_child(code: str, *args: str, env: Optional[dict] = None) -> subprocess.Popen:
    """Starts ``python -c code args...`` with text pipes."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def read_line(proc: subprocess.Popen, timeout: float = WAIT) -> str:
    """The next line the child prints, or an AssertionError after ``timeout``."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"the child printed nothing within {timeout}s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"the child exited ({proc.wait(WAIT)}) without printing; stderr:\n{err}")
    return line.strip()


def finish(proc: subprocess.Popen) -> None:
    """Kills a child if it still runs and reaps it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=WAIT)
    for f in (proc.stdout, proc.stderr):
        if f:
            f.close()


def wait_child(pid: int, timeout: float = WAIT) -> int:
    """Waits for a forked child and returns its exit code; kills it and
    fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            if os.WIFSIGNALED(status):
                raise AssertionError(f"child {pid} died of signal {os.WTERMSIG(status)}")
            return os.WEXITSTATUS(status)
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout}s")
        time.sleep(0.01)
