"""MONAI Label's local datastore for tomograms: MRC/TIFF/NIfTI studies, checked labels and images.

``LocalDatastore`` accepts any file: a label of the wrong shape or format would only fail at the next
training, far from the click that saved it. Here a new image or label is opened with the bundle's
readers first; a bad one gets an HTTP error with the reason and the datastore is left as it was.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .training_data import ANNOTATED_KEY, open_label, parse_annotated_spec

logger = logging.getLogger(__name__)

# Tomograms (MRC family as IMOD names them, TIFF stacks) and NIfTI, which 3D Slicer writes labels in.
DEFAULT_EXTENSIONS = ("*.mrc", "*.rec", "*.tif", "*.tiff", "*.nii.gz", "*.nii")


def parse_extensions(value: str | None) -> list[str]:
    """``--conf extensions "*.mrc,*.tif"`` -> patterns; default DEFAULT_EXTENSIONS."""
    if not value:
        return list(DEFAULT_EXTENSIONS)
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    return [p if p.startswith("*") else f"*{p if p.startswith('.') else '.' + p}" for p in patterns]


def known_ids(ids: list[str], shown: int = 10) -> str:
    """A short list of ids for error messages."""
    ids = sorted(ids)
    return ", ".join(ids[:shown]) + (f" ... ({len(ids)} in all)" if len(ids) > shown else "") or "none"


class TomogramDatastore(LocalDatastore):
    """A ``LocalDatastore`` that validates what clients upload (PUT /datastore/image and /label)."""

    def _suffix_ok(self, filename: str) -> str | None:
        """The datastore pattern the file matches (longest first, so .nii.gz beats .gz), else None."""
        name = filename.lower()
        for pattern in sorted(self._extensions, key=len, reverse=True):
            if name.endswith(pattern.lstrip("*").lower()):
                return pattern
        return None

    def _open(self, path: str, what: str) -> Any:
        from scripts.io.volume import SUPPORTED_SUFFIXES, VolumeError, open_volume, volume_suffix

        if self._suffix_ok(path) is None or volume_suffix(path) not in SUPPORTED_SUFFIXES:
            hint = " (3D Slicer: set MONAI Label's file extension to .nii.gz)" if what == "label" else ""
            raise HTTPException(
                status_code=415,
                detail=f"{what} format {volume_suffix(path) or '(none)'!r} is not supported; use one of "
                f"{', '.join(p.lstrip('*') for p in self._extensions)}{hint}",
            )
        try:
            return open_label(path) if what == "label" else open_volume(path, check_finite=False)
        except (VolumeError, OSError) as err:
            raise HTTPException(status_code=422, detail=f"{what} cannot be read: {err}") from err

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        self._open(image_filename, "image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore; "
                                f"known images: {known_ids(self.list_images())}")
        label = self._open(label_filename, "label")
        from scripts.io.volume import VolumeError, open_volume

        try:
            image = open_volume(image_uri, check_finite=False)
        except (VolumeError, OSError) as err:
            raise HTTPException(status_code=422, detail=f"image {image_id!r} cannot be read: {err}") from err
        if label.shape != image.shape:
            raise HTTPException(
                status_code=422,
                detail=f"label shape {list(label.shape)} (z, y, x) does not match image {image_id!r} "
                f"of shape {list(image.shape)}",
            )
        try:
            parse_annotated_spec((label_info or {}).get(ANNOTATED_KEY), label.shape[0])
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        return super().save_label(image_id, label_filename, label_tag, label_info)
