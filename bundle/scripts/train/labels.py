"""The (target, mask) pair a training slice's label becomes.

The convention itself (membrane 1, not annotated 255, background 0) and its checks live in
``scripts.io.labels``, shared with the MONAI Label app; this module only maps checked labels to what
the loss takes, so the slice loader (``slices``) needs nothing from the folder layout (``dataset``).
"""

from __future__ import annotations

import os

import numpy as np
from scripts.io.labels import IGNORE_VALUE, MEMBRANE, canonical_labels

__all__ = ["label_to_target"]


def label_to_target(raw: np.ndarray, path: str | os.PathLike = "label", z: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(target, mask) for label slice ``z`` of ``path``: membrane 1 -> +1, background 0 -> -1, not
    annotated 255 -> target -1 with mask 0. Both float32, same shape. Other values raise a LabelError
    (``scripts.io.labels``) naming the file and the slice."""
    raw = canonical_labels(raw, path, z)
    mask = raw != IGNORE_VALUE
    target = np.where(raw == MEMBRANE, 1.0, -1.0).astype(np.float32)
    return target, mask.astype(np.float32)
