"""Label volumes, read one way everywhere: membrane = 1, not annotated = 255, background = 0.

Training (``scripts.train.dataset``, ``scripts.train.labels``) and the MONAI Label app read labels
only through this module, so a label means the same thing wherever it is read. Other values (the
classes of a multi-class label map, a probability map) are refused naming the file: guessing which
of them is membrane would train the network on the wrong target without a word. Labels can be as large as
their tomograms, so volumes are checked slab by slab, never loaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scripts.io.volume import VolumeError, iter_slabs

__all__ = [
    "BACKGROUND",
    "CONVENTION",
    "IGNORE_VALUE",
    "MEMBRANE",
    "LabelError",
    "LabelScan",
    "canonical_labels",
    "scan_labels",
]

BACKGROUND, MEMBRANE, IGNORE_VALUE = 0, 1, 255
CONVENTION = "membrane = 1, not annotated = 255, background = 0"
_MAX_SHOWN = 10  # distinct bad values collected before a scan stops and reports
_VALID_U8 = np.zeros(256, dtype=bool)
_VALID_U8[[BACKGROUND, MEMBRANE, IGNORE_VALUE]] = True


class LabelError(VolumeError):
    """A label volume with values outside the convention (a VolumeError, so callers handle it alike)."""


def _split(block: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(block viewed as unsigned where int8, index of its first slice with a bad value or -1,
    its distinct values outside 0/1/255). A 2D block is one slice."""
    block = np.asarray(block)
    if block.dtype == np.int8:  # MRC mode 0 without the IMOD unsigned flag: 255 reads as -1
        block = block.view(np.uint8)
    if block.dtype == np.uint8:
        valid = _VALID_U8[block]  # one bool temporary instead of three comparisons
    else:
        valid = (block == BACKGROUND) | (block == MEMBRANE) | (block == IGNORE_VALUE)
    if valid.all():
        return block, -1, block[:0]
    rows = valid.reshape(block.shape[0] if block.ndim == 3 else 1, -1).all(axis=1)
    return block, int(np.flatnonzero(~rows)[0]), np.unique(block[~valid])  # unique: one NaN at most


def _shown(values: Sequence[float]) -> str:
    text = [str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:_MAX_SHOWN]]
    return ", ".join(text) + (", ..." if len(values) > _MAX_SHOWN else "")


def _error(path: str | os.PathLike, values: Sequence[float], first_z: int) -> LabelError:
    return LabelError(
        f"{path}: label values {_shown(values)} (first at slice z={first_z}) are not allowed; labels "
        f"must be {CONVENTION}. A label map with several classes? Set the membrane class to 1 and every "
        "other class to 0 (docs/data.md)"
    )


def canonical_labels(block: np.ndarray, path: str | os.PathLike, z0: int = 0) -> np.ndarray:
    """A raw label block (slices from ``z0``) as uint8 0/1/255; LabelError naming ``path`` otherwise.

    int8 data (an MRC label written without the IMOD unsigned flag) is read as unsigned; integer and
    float blocks holding exactly 0, 1 and 255 are accepted.
    """
    block, first, bad = _split(block)
    if bad.size:
        raise _error(path, bad.tolist(), z0 + first)
    return block.astype(np.uint8, copy=False)


@dataclass
class LabelScan:
    """What a label volume holds, per z slice."""

    annotated: list[int] = field(default_factory=list)  # slices not entirely 255
    membrane: list[int] = field(default_factory=list)  # slices with a membrane voxel
    uses_ignore: bool = False  # some voxel is 255


def scan_labels(data: np.ndarray, path: str | os.PathLike, slices: Sequence[int] | None = None) -> LabelScan:
    """Check the values of a (z, y, x) label volume and list its annotated and membrane slices.

    Reads slab by slab (``slices``: only those z indices). Every bad value of the file is collected
    (up to a few) so the LabelError names them all, not just those of the first slab.
    """
    scan = LabelScan()
    bad: list[np.ndarray] = []
    first_bad = -1
    if slices is None:
        ranges = list(iter_slabs(data.shape[0], data[0].nbytes))
    else:
        ranges = [(int(z), int(z) + 1) for z in slices]
    for start, stop in ranges:
        block, first, found = _split(data[start:stop])
        if found.size:
            first_bad = start + first if first_bad < 0 else first_bad
            bad = [np.unique(np.concatenate([*bad, found]))]
            if bad[0].size > _MAX_SHOWN:
                break
            continue
        flat = block.reshape(block.shape[0], -1)
        ignore = flat == IGNORE_VALUE
        scan.uses_ignore |= bool(ignore.any())
        scan.annotated.extend(int(start + i) for i in np.flatnonzero(~ignore.all(axis=1)))
        scan.membrane.extend(int(start + i) for i in np.flatnonzero((flat == MEMBRANE).any(axis=1)))
    if bad:
        raise _error(path, bad[0].tolist(), first_bad)
    return scan
