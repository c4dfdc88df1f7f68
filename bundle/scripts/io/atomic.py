"""Atomic file output: write to a temporary file next to the target, then rename it into place."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PARTIAL_MARKER", "atomic_output", "full_suffix"]

# Marks temporary files so that folder scans (find_volumes) can skip them.
PARTIAL_MARKER = ".partial-"
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


def full_suffix(path: str | os.PathLike) -> str:
    """Suffix including a compression suffix (``.nii.gz``), in the case it has in the name."""
    suffixes = Path(path).suffixes
    if not suffixes:
        return ""
    if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSION_SUFFIXES:
        return suffixes[-2] + suffixes[-1]
    return suffixes[-1]


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
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
