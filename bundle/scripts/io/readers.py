"""MONAI ImageReaders for tomograms, built on ``scripts.io.volume.open_volume``.

Arrays stay in (z, y, x) order and spacing is in nm, (z, y, x). The affine maps array indices
(z, y, x) to nm in the same order; it is not a RAS/LPS patient frame, so do not use Orientation(d) or
Spacing(d) on these images (see docs/data.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import ensure_tuple
from scripts.io.volume import (
    MRC_SUFFIXES,
    NIFTI_SUFFIXES,
    TIFF_SUFFIXES,
    VOLUME_SUFFIXES,
    Volume,
    VolumeError,
    open_volume,
    volume_suffix,
)

__all__ = ["MrcReader", "NiftiVolumeReader", "TiffStackReader", "VolumeReader", "volume_meta"]

PathLike = str | os.PathLike


def volume_meta(volume: Volume) -> dict[str, Any]:
    """MONAI-style metadata for a Volume: spacing/pixdim in nm (z, y, x), affine in nm, shapes."""
    known = volume.voxel_size_nm is not None
    spacing = np.asarray(volume.voxel_size_nm if known else (np.nan,) * 3, dtype=np.float64)
    affine = np.eye(4)
    if known:
        affine[:3, :3] = np.diag(spacing)
    if volume.origin_angstrom is not None and known:
        affine[:3, 3] = np.asarray(volume.origin_angstrom, dtype=np.float64)[::-1] / 10.0  # (z, y, x) nm
    meta: dict[str, Any] = {
        "spacing": spacing,
        "pixdim": spacing.copy(),
        "voxel_size_known": known,
        "affine": affine,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(volume.data.shape),
        "original_channel_dim": "no_channel",
        "filename_or_obj": str(volume.path),
    }
    if volume.origin_angstrom is not None:
        meta["origin_angstrom"] = np.asarray(volume.origin_angstrom, dtype=np.float64)
    return meta


class VolumeReader(ImageReader):
    """Reads every format of ``open_volume`` (OME-Zarr folders too); subclasses narrow the suffixes.

    Keyword arguments (``voxel_size_nm``, ``allow_2d``, ``check_finite``, ``level``) go to ``open_volume``.
    A list of files is stacked on a new first (channel) axis; they must have the same shape.
    """

    suffixes: tuple[str, ...] = VOLUME_SUFFIXES

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(volume_suffix(f) in self.suffixes for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Volume | list[Volume]:
        options = {**self.kwargs, **kwargs}
        volumes = []
        for name in ensure_tuple(data):
            if not self.verify_suffix(name):
                raise VolumeError(f"{name}: {type(self).__name__} reads only {', '.join(self.suffixes)}")
            volumes.append(open_volume(Path(name), **options))
        return volumes[0] if len(volumes) == 1 else volumes

    def get_data(self, img: Volume | Sequence[Volume]) -> tuple[np.ndarray, dict]:
        volumes = [img] if isinstance(img, Volume) else list(img)
        meta = volume_meta(volumes[0])
        # copies: MONAI wraps the array in a tensor, and in-place ops on a read-only memmap would crash
        if len(volumes) == 1:
            return np.array(volumes[0].data), meta
        shapes = {v.data.shape for v in volumes}
        if len(shapes) > 1:
            names = [str(v.path) for v in volumes]
            raise VolumeError(f"cannot stack {names}: shapes differ {sorted(shapes)}")
        meta["original_channel_dim"] = 0
        return np.stack([v.data for v in volumes]), meta


class MrcReader(VolumeReader):
    """MRC family: .mrc .rec .st .map .mrcs."""

    suffixes = MRC_SUFFIXES


class TiffStackReader(VolumeReader):
    """TIFF stacks: .tif .tiff (ImageJ, OME and plain multi-page)."""

    suffixes = TIFF_SUFFIXES


class NiftiVolumeReader(VolumeReader):
    """NIfTI (.nii, .nii.gz) read as (z, y, x) in nm, unlike MONAI's NibabelReader."""

    suffixes = NIFTI_SUFFIXES
