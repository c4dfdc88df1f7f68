"""Handing memory back to the kernel during long slice-by-slice runs.

- Pages of a file mapping stay in the process's resident set once touched, so a pass over a
  memory-mapped tomogram would end up "holding" the whole file (and every output file) in
  ``top``/``ps`` figures. Neither numpy nor mrcfile/tifffile expose ``madvise`` on an array's
  address range, hence :func:`release_pages` around the C call.
- glibc keeps freed blocks of odd-sized large tensors in its heap (its mmap threshold adapts
  upwards), which grew a 400-slice run by gigabytes; :func:`trim_heap` returns them.
- The opposite, for the network's own activations: glibc serves every allocation above 32 MB with a
  fresh memory map whose pages the kernel faults in and zeroes at first touch, slice after slice
  (PyTorch keeps no cache of CPU memory). :func:`keep_freed_memory` makes glibc take all memory from
  its heap and never trim it, so the next slice reuses the last one's pages: the process holds the
  peak of one slice (about 1.5x its live tensors, measured) and no more, and skips the page faults.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

__all__ = ["heap_kept", "keep_freed_memory", "release_pages", "trim_heap"]

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (not musl)
_MALLOPT = getattr(_LIBC, "mallopt", None)  # glibc only
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_heap_kept = False
# Modes that map the file shared or read-only: dropping a page loses nothing (dirty pages are
# written back from the page cache). A copy-on-write ("c") mapping would lose its changes.
_SAFE_MODES = ("r", "r+", "w+")


def release_pages(view: np.ndarray) -> None:
    """Drop the pages under ``view`` from this process's resident set; a no-op for ordinary arrays.

    The data stays in the file (and in the kernel's page cache): a later access reads it back.
    """
    if _LIBC is None or _MADV_DONTNEED is None or view.size == 0:
        return
    if not isinstance(view, np.memmap) or getattr(view, "mode", None) not in _SAFE_MODES:
        return
    if not view.flags.c_contiguous:
        return
    start = view.ctypes.data
    # Whole pages around the view: a neighbouring slab that shares an edge page just reads it again.
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length = start + view.nbytes - first
    _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), ctypes.c_int(_MADV_DONTNEED))


def keep_freed_memory() -> bool:
    """From now on, freed memory stays in this process for reuse (glibc: no memory maps, no trimming);
    :func:`trim_heap` becomes a no-op. Process-wide and for the rest of the process. Returns whether
    it applies (False where the C library is not glibc: nothing changes)."""
    global _heap_kept
    if _heap_kept:
        return True
    if _MALLOPT is None or not (_MALLOPT(_M_MMAP_MAX, 0) and _MALLOPT(_M_TRIM_THRESHOLD, -1)):  # -1: never
        return False
    _heap_kept = True
    return True


def heap_kept() -> bool:
    """Whether :func:`keep_freed_memory` applies in this process."""
    return _heap_kept


def trim_heap() -> None:
    """Return the C heap's free memory to the kernel (glibc ``malloc_trim``); a no-op elsewhere and
    once :func:`keep_freed_memory` applies (the memory is kept for the next slice on purpose)."""
    if _MALLOC_TRIM is not None and not _heap_kept:
        _MALLOC_TRIM(ctypes.c_size_t(0))
