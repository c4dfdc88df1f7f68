"""Disk space for outputs written through memory maps: check it before, reserve it up front.

A write through a shared memory map into a file whose blocks were never allocated has no way to
report a full disk: the kernel sends SIGBUS and the process dies without a message, leaving its
partial files behind. So every file that is mapped for writing gets its blocks reserved first
(``posix_fallocate``, which fails with an ordinary ENOSPC), and callers check the free space of the
output folder before starting work whose size they know.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DiskSpaceError", "check_free_space", "megabytes", "new_memmap", "reserve"]

# File systems that cannot reserve blocks (some network and copy-on-write ones) say so with these;
# the free-space check before the work is then the only guard.
_CANNOT_RESERVE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class DiskSpaceError(OSError):
    """Not enough free space in an output folder; the message names the folder and the sizes."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise DiskSpaceError unless ``folder``'s file system has ``needed`` bytes free for ``what``."""
    folder = Path(folder)
    free = _free(folder)
    if 0 <= free < needed:
        raise DiskSpaceError(
            errno.ENOSPC,
            f"{folder}: not enough free space for {what}: {megabytes(needed)} needed, {megabytes(free)} free",
        )


def reserve(path: str | os.PathLike, what: str | None = None) -> None:
    """Allocate the blocks of the (sparse) file ``path`` over its whole current size.

    On a full disk this raises DiskSpaceError naming the folder, instead of a later SIGBUS.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            _allocate(fd, size, path, what)
    finally:
        os.close(fd)


def _allocate(fd: int, size: int, path: Path, what: str | None) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in _CANNOT_RESERVE:
            return
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free(path.parent)
            raise DiskSpaceError(
                err.errno,
                f"{path.parent}: not enough free space for {what or path.name}: {megabytes(size)} needed"
                + (f", {megabytes(free)} free" if free >= 0 else ""),
            ) from err
        raise


def new_memmap(
    path: str | os.PathLike, dtype: np.dtype | str, shape: Sequence[int], what: str | None = None
) -> np.memmap:
    """A new zero-filled file mapped for writing, its blocks reserved (unlike ``np.memmap(mode="w+")``)."""
    path = Path(path)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        if nbytes:
            _allocate(fd, nbytes, path, what)
            os.ftruncate(fd, nbytes)  # file systems that cannot reserve still need the size
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return np.memmap(path, dtype=dtype, mode="r+", shape=tuple(shape))
