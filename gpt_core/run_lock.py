"""One writer per run directory: an OS file lock that :func:`gpt_core.train.train` holds while it runs.

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``. The kernel drops it when its holder exits, however
it exits (SIGKILL and power loss included), so a killed run never leaves a stale lock: the next
``gptkit train --out RUN --resume`` takes it at once. The holder writes its pid, host and start
time into the file, and a second writer is refused in one line that names them. The file is
removed when the run ends (and a run directory the lock itself created, if it is still empty).

Where ``fcntl`` does not exist (Windows) runs are not locked, and nothing is said about it.
Under torchrun only global rank 0 writes, so only it locks (``gpt_core.train`` does that); on
several machines the run directory is then locked on rank 0's machine, or on the shared storage
(flock works on NFSv4 and the common cluster file systems).

Also here, the other guard around a run's process: :class:`StopOnSigint` (Ctrl-C stops cleanly).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from runtime.errors import GptkitError

LOCK_FILE = ".lock"


class RunDirectoryBusyError(GptkitError):
    """Another process is training into the same run directory."""


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (RunDirectoryBusyError if taken)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the run goes unlocked, without an error
            return
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: someone holds it
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created_dir()
                raise RunDirectoryBusyError(
                    f"{self.run_dir} is in use by another training run ({holder}); wait for it "
                    "to finish or stop it, or train into another --out"
                ) from None
            # The previous holder removes the file as it lets go: if it did so between our open
            # and our flock, we hold a lock on a deleted file; open the new one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding it (see acquire)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        """A run directory made only to hold the lock goes again if nothing was written to it."""
        if self._created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:  # not empty: the run wrote something, which stays
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _read_holder(fd: int) -> str:
    """``pid 123 on host, started 2025-01-01 12:00:00 UTC`` from the lock file, as far as known."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info: Any = json.loads(os.read(fd, 4096).decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "a process that is just starting"


# Under torchrun a Ctrl-C in the terminal reaches each worker twice: straight from the terminal
# (the worker is in its process group) and again from the launcher, which passes every SIGINT it
# gets on to its workers. A SIGINT that soon after the first is taken as that same Ctrl-C.
TORCHRUN_RELAY_WINDOW_S = 2.0


class StopOnSigint:
    """The first Ctrl-C asks the loop to stop after this step; a second one stops at once.

    Under torchrun (``TORCHELASTIC_RUN_ID`` set) a SIGINT within ``relay_window`` seconds of the
    first is not a second Ctrl-C but torchrun's relay of the first one (see above).
    """

    def __init__(self, relay_window: float | None = None) -> None:
        self.requested = False
        self._previous: Any = None
        if relay_window is None:
            under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
            relay_window = TORCHRUN_RELAY_WINDOW_S if under_torchrun else 0.0
        self.relay_window = relay_window
        self._first = 0.0

    def __enter__(self) -> StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first < self.relay_window:
                return  # the same Ctrl-C, relayed by torchrun
            raise KeyboardInterrupt
        self.requested, self._first = True, now

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
