"""Post-processing of slice-wise membrane masks (section 5 of the method)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects

__all__ = ["PostProcessing"]


@dataclass
class PostProcessing:
    """Turn tanh predictions into a binary mask.

    Args:
        threshold: foreground where tanh > threshold (the reference uses 0).
        erosion_iterations: 2D binary erosions per slice (thinner contours, better object
            separation, more false negatives).
        border_crop: pixels zeroed at the y/x border of every slice (reconstruction artefacts).
        min_object_voxels: 3D connected components (26-connectivity) smaller than this are removed.
    """

    threshold: float = 0.0
    erosion_iterations: int = 0
    border_crop: int = 0
    min_object_voxels: int = 0

    def slices(self, label: np.ndarray) -> np.ndarray:
        """Per-slice steps on a ``(B, H, W)`` tanh batch: threshold, erosion, border crop -> uint8."""
        mask = label > self.threshold
        if self.erosion_iterations > 0:
            # Erode in-plane only: the mask is predicted slice by slice.
            structure = ndimage.generate_binary_structure(2, 1)[None]
            mask = ndimage.binary_erosion(mask, structure, iterations=self.erosion_iterations)
        if self.border_crop > 0:
            band = self.border_crop
            mask[:, :band] = mask[:, -band:] = False
            mask[:, :, :band] = mask[:, :, -band:] = False
        return mask.astype(np.uint8)

    @property
    def needs_volume(self) -> bool:
        return self.min_object_voxels > 1

    def volume(self, mask: np.ndarray) -> np.ndarray:
        """Whole-volume steps on a ``(Z, H, W)`` uint8 mask, in place where possible."""
        if self.needs_volume:
            keep = remove_small_objects(mask.astype(bool), max_size=self.min_object_voxels - 1, connectivity=3)
            mask[...] = keep
        return mask
