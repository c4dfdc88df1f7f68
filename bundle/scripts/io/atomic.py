"""Atomic file output: write to a temporary file next to the target, then rename it into place.

The target may also be a folder (an OME-Zarr store): it is written as a temporary folder and renamed
the same way. Also the checks of an output folder (a folder, writable), so that errors name the folder
the user chose rather than a hidden temporary file in it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = [
    "PARTIAL_MARKER",
    "OutputFolderError",
    "atomic_output",
    "full_suffix",
    "output_folder",
    "remove_output",
]

_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}

# Marks temporary files so that folder scans (find_volumes) can skip them.
PARTIAL_MARKER = ".partial-"
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


def full_suffix(path: str | os.PathLike) -> str:
    """Suffix including a compression suffix (``.nii.gz``), in the case it has in the name."""
    suffixes = Path(path).suffixes
    if not suffixes:
        return ""
    if len(suffixes) >= 2 and (
        suffixes[-1].lower() in _COMPRESSION_SUFFIXES or (suffixes[-2] + suffixes[-1]).lower() == ".ome.zarr"
    ):
        return suffixes[-2] + suffixes[-1]
    return suffixes[-1]


def remove_output(path: str | os.PathLike) -> None:
    """Remove a file or a folder (a partial OME-Zarr store) if it exists; a link itself, not its target."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    if not (tmp.is_dir() and path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside, then drop it. The final
    # name is missing for the moment between the two renames, never half-written.
    old = tmp.with_name(tmp.name.replace(PARTIAL_MARKER, f"{PARTIAL_MARKER}old-", 1))
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    remove_output(old)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``path``; rename it onto ``path`` on success.

    The temporary name is ``.NAME.partial-<random><suffix>``: hidden, marked as partial, and ending in
    the real suffix so that libraries that pick the format from the extension still work. On an
    exception (KeyboardInterrupt included) the temporary file is removed and the exception re-raised,
    so a half-written file never appears under the final name.
    """
    path = Path(path)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.parent / f".{stem}{PARTIAL_MARKER}{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: nothing was written to the temporary file {tmp.name}")
        _replace(tmp, path)
    except OSError as err:
        with suppress(OSError):
            remove_output(tmp)
        if err.errno in _NOT_WRITABLE and err.filename is not None and Path(err.filename) == tmp:
            raise OutputFolderError(
                err.errno, f"{path.parent}: cannot write into this folder ({err.strerror})"
            ) from err
        raise
    except BaseException:
        remove_output(tmp)
        raise


class OutputFolderError(OSError):
    """An output folder that is a file, cannot be created or cannot be written; the message names it."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def output_folder(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """Create ``path`` if needed and check that it is a writable folder; returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(errno.ENOTDIR, f"{path}: {name} is an existing file; a folder was expected")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else err.strerror
        raise OutputFolderError(err.errno, f"{path}: cannot create the {name} folder ({why})") from err
    if not os.access(path, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        why = "read-only file system" if read_only else "permission denied"
        raise OutputFolderError(errno.EACCES, f"{path}: cannot write into the {name} folder ({why})")
    return path
