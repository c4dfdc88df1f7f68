"""Voxel-size matching: run the network at the voxel size it was trained at, return the input's grid.

A membrane is 1-4 voxels thick; weights trained at 9.8 nm see a 20 nm tomogram's membranes at half
the thickness they learnt. So when both voxel sizes are known and differ by more than 10 %, each
batch of slices is resampled in plane to the weights' voxel size before the network, and every
output (tanh, reconstruction, TTA variance) is resampled back to the input's height and width: the
outputs keep the input's shape and header. Per batch, so memory stays bounded by the batch.

Resampling is torch's ``F.interpolate`` (bilinear, ``antialias=True``: a box-like filter widened
by the shrink factor), not MONAI's ``Resize``: the latter's anti-aliasing Gaussian pads with zeros,
which darkens the border pixels (a constant slice halved in size drops to 0.85 at its corners) and
would draw a false edge around every slice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["TOLERANCE", "VoxelMatch", "match_voxel_size", "resample_slices", "resampled_size"]

logger = logging.getLogger(__name__)

TOLERANCE = 0.10  # relative voxel-size difference below which slices are used as they are
# Beyond this factor a header is more likely wrong (Angstrom read as nm, a placeholder) than right.
MAX_SCALE = 8.0


@dataclass(frozen=True)
class VoxelMatch:
    """The voxel-size decision for one tomogram, as the summary records it.

    Attributes:
        tomogram_voxel_size_nm: in-plane (y, x) voxel size of the tomogram (header or override).
        weights_voxel_size_nm: the voxel size the weights were trained at.
        enabled: the ``match_voxel_size`` option.
        resampled: whether slices go through the network resampled.
        scale: (y, x) factor from the input grid to the network's grid (> 1: upsampled).
        reason: why there is no resampling, when there is none.
    """

    tomogram_voxel_size_nm: tuple[float, float] | None
    weights_voxel_size_nm: float | None
    enabled: bool
    resampled: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    reason: str | None = None

    def summary(self) -> dict:
        out = asdict(self)
        for key in ("tomogram_voxel_size_nm", "scale"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


def match_voxel_size(
    voxel_size_nm: Sequence[float] | None, weights_voxel_size_nm: float | None, enabled: bool = True
) -> VoxelMatch:
    """Decide whether (and by how much) to resample a tomogram of ``voxel_size_nm`` ((z, y, x) or
    (y, x), None when unknown) for weights trained at ``weights_voxel_size_nm``."""
    in_plane = tuple(float(v) for v in voxel_size_nm[-2:]) if voxel_size_nm is not None else None
    match = VoxelMatch(in_plane, weights_voxel_size_nm, bool(enabled))
    if not enabled:
        return _no(match, "match_voxel_size is false")
    if in_plane is None:
        return _no(match, "the tomogram's voxel size is unknown (no header value; set voxel_size_nm)")
    if weights_voxel_size_nm is None:
        return _no(match, "the weights' voxel size is unknown (no metadata beside the weights file)")
    scale = tuple(v / float(weights_voxel_size_nm) for v in in_plane)
    if all(abs(s - 1.0) <= TOLERANCE for s in scale):
        return _no(match, f"within {TOLERANCE:.0%} of the weights' voxel size")
    if any(s > MAX_SCALE or s < 1.0 / MAX_SCALE for s in scale):
        return _no(
            match,
            f"{in_plane} nm is more than {MAX_SCALE:g}x away from the weights' "
            f"{weights_voxel_size_nm:g} nm: check the header or set voxel_size_nm",
        )
    return VoxelMatch(in_plane, weights_voxel_size_nm, True, True, scale)  # type: ignore[arg-type]


def _no(match: VoxelMatch, reason: str) -> VoxelMatch:
    return VoxelMatch(match.tomogram_voxel_size_nm, match.weights_voxel_size_nm, match.enabled, reason=reason)


def resampled_size(shape: Sequence[int], scale: Sequence[float]) -> tuple[int, int]:
    """(height, width) of a ``shape[-2:]`` slice on the network's grid (at least 1 pixel)."""
    return tuple(max(1, math.floor(n * s + 0.5)) for n, s in zip(shape[-2:], scale, strict=True))


def resample_slices(slices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, H, W)`` float slices resampled to ``(B, *size)``: bilinear, anti-aliased when shrinking.

    Both grids span the same field of view (pixel edges on pixel edges), so a round trip returns to
    the same place. Linear in the input, so ``-x`` maps to exactly ``-(result for x)``.
    """
    size = tuple(int(n) for n in size)
    if tuple(slices.shape[-2:]) == size:
        return slices
    out = F.interpolate(slices.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0]
