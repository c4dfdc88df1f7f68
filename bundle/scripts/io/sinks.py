"""The one interface every output of a slice-by-slice run is written through.

A :class:`Sink` receives a (z, y, x) volume block by block, in any order, then is closed (the result
is kept) or aborted (it is dropped). The file writers (``scripts.io.volume.SliceWriter`` and the MRC,
TIFF and NIfTI sinks behind it) and :class:`ArraySink` (an array or a raw memory map: MONAI Label's
in-memory mask, the shared staging files of several ranks) all implement it, so the segmentation
core does not care where its slices go.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from scripts.io.pages import release_pages

__all__ = ["ArraySink", "Sink"]


class Sink(Protocol):
    """Where the slices of one output volume go."""

    def write(self, z0: int, block: np.ndarray) -> None:
        """Store ``block`` (n, y, x) as slices ``z0 .. z0 + n - 1``."""

    def close(self) -> None:
        """Every slice is written: make the result final."""

    def abort(self) -> None:
        """Something failed: drop what was written (as far as the sink can)."""


class ArraySink:
    """A sink into an existing (z, y, x) array; a memory map's written pages are released."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def write(self, z0: int, block: np.ndarray) -> None:
        self.array[z0 : z0 + block.shape[0]] = block
        release_pages(self.array[z0 : z0 + block.shape[0]])

    def close(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def abort(self) -> None:
        """Nothing to drop: the array belongs to the caller."""
