"""Per-tomogram locks, so that runs sharing an output folder never touch each other's files.

A run holds ``OUTPUT/.NAME.lock`` while it writes NAME's outputs, and only removes NAME's partial
files left by a killed run while it holds that lock. The lock is a kernel ``flock``: it ends with
the process, so a ``kill -9`` never leaves a stale lock (the file may stay; it is reused).

Own code rather than the ``filelock`` package: that one keeps its lock files and can fall back to
marker files that survive a killed process; this needs ``flock`` only and removes its file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

__all__ = ["FileLock"]


class FileLock:
    """An exclusive ``flock`` on ``path``; the file is created on acquiring and removed on release."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking`` False return False at once if another process holds it."""
        if self._fd is not None:
            return True
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # The holder we waited for removes the file on release: our lock is then on a file that
            # is gone, and a third process may already hold a new one. Start again in that case.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
