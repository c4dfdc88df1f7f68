"""What the values of a label volume mean (docs/data.md): 0 background, 255 not annotated, any
other value membrane; and the (target, mask) pair a training slice becomes.

Its own module because both the folder layout (``dataset``) and the slice loader (``slices``) need
the convention, and neither should import the other for it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IGNORE_VALUE", "label_to_target"]

IGNORE_VALUE = 255


def label_to_target(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, mask) for a uint8 label slice: membrane (any value but 0 and 255) -> +1,
    background 0 -> -1, not annotated 255 -> target -1 with mask 0. Both float32, same shape."""
    raw = np.asarray(raw)
    if raw.dtype == np.int8:  # MRC mode 0 written without the IMOD unsigned flag: 255 reads as -1
        raw = raw.view(np.uint8)
    mask = raw != IGNORE_VALUE
    target = np.where(mask & (raw != 0), 1.0, -1.0).astype(np.float32)
    return target, mask.astype(np.float32)
