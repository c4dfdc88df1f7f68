"""MONAI Label's local datastore for tomograms: MRC/TIFF/NIfTI studies, checked labels and images.

``LocalDatastore`` accepts any file: a label of the wrong shape or format would only fail at the next
training, far from the click that saved it. Here a new image or label is opened with the bundle's
readers first; a bad one gets an HTTP error with the reason and the datastore is left as it was.

``LocalDatastore`` also joins the request's image id and label tag into paths as they come, so
``../x`` or ``/abs/x`` reached files outside the studies folder. Here a new id or tag must be a plain
name (``safe_paths``), an existing one must be known, and every path is resolved and refused (HTTP
400) unless it lies inside the studies folder, before anything is read, written or deleted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .safe_paths import NAME_RULE, UnsafePathError, check_plain_name, inside, is_plain_name
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


class RefusedPath(HTTPException, ValueError):
    """HTTP 400 for an id, tag or path that is not allowed; a ValueError too, so that the training-data
    linker skips the study with this reason instead of failing the run."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=400, detail=detail)

    def __str__(self) -> str:
        return str(self.detail)


class TomogramDatastore(LocalDatastore):
    """A ``LocalDatastore`` that validates what clients upload (PUT /datastore/image and /label) and
    keeps every file it reads, writes or deletes inside the studies folder."""

    # ------------------------------------------------------------------ names and paths

    @property
    def studies(self) -> Path:
        return Path(self._datastore_path).resolve()

    def _inside(self, path: str | os.PathLike, what: str) -> Path:
        try:
            return inside(path, self.studies, what)
        except UnsafePathError as err:
            raise RefusedPath(str(err)) from None

    def _known_image(self, image_id: Any) -> str:
        """``image_id`` if the datastore lists it; 400 for a name that could not be one, else 404."""
        if isinstance(image_id, str) and image_id in self._datastore.objects:
            return image_id
        if not is_plain_name(image_id):
            raise RefusedPath(f"image id {image_id!r} is not a plain name (use {NAME_RULE})")
        raise HTTPException(
            status_code=404,
            detail=f"image {image_id!r} is not in the datastore; known images: {known_ids(self.list_images())}",
        )

    def _plain_tag(self, tag: Any) -> str:
        try:
            return check_plain_name(tag, "label tag")
        except UnsafePathError as err:
            raise RefusedPath(str(err)) from None

    def get_image_uri(self, image_id: str) -> str:
        """The resolved path of a known image ("" if unknown); 400 for a path-like id or a file that
        resolves outside the studies folder (e.g. a symbolic link to elsewhere)."""
        if isinstance(image_id, str) and image_id in self._datastore.objects:
            return str(self._inside(super().get_image_uri(image_id), f"image {image_id!r}"))
        if not is_plain_name(image_id):
            raise RefusedPath(f"image id {image_id!r} is not a plain name (use {NAME_RULE})")
        return ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag) if isinstance(label_tag, str) else ""
        if uri:
            return str(self._inside(uri, f"label {label_id!r} (tag {label_tag!r})"))
        if not is_plain_name(label_id) and label_id not in self._datastore.objects:
            raise RefusedPath(f"image id {label_id!r} is not a plain name (use {NAME_RULE})")
        self._plain_tag(label_tag)
        return ""

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Labeled pairs (GET /datastore/?output=train, the dataset zip): files inside the studies folder."""
        pairs = super().datalist(full_path)
        if not full_path:
            return pairs
        kept = []
        for pair in pairs:
            try:
                for key in ("image", "label"):
                    self._inside(pair[key], key)
            except RefusedPath as err:
                logger.warning("datastore: %s; left out", err)
                continue
            kept.append(pair)
        return kept

    # ------------------------------------------------------------------ reading uploads

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

    # ------------------------------------------------------------------ changes (PUT, DELETE)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if not image_id:  # MONAI Label names it after the upload; say how to name it instead
            raise RefusedPath("no image id: give one as ?image=ID")
        try:
            check_plain_name(image_id, "image id")
        except UnsafePathError as err:
            raise RefusedPath(f"{err}; give another as ?image=ID") from None
        if image_id in self._datastore.objects:  # replacing it would orphan its labels
            raise HTTPException(
                status_code=409,
                detail=f"image {image_id!r} is already in the datastore: "
                "delete it first (DELETE /datastore/image?id=...) or choose another id",
            )
        self._open(image_filename, "image")  # 415 for a suffix that is not the datastore's
        dest = self.studies / self._filename(image_id, self._to_id(os.path.basename(image_filename))[1])
        if os.path.lexists(dest):  # a file the datastore does not list (another extension, a link)
            raise HTTPException(status_code=409, detail=f"{dest.name} already exists in the studies folder")
        self._inside(dest, f"image {image_id!r}")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._known_image(image_id)
        self.get_image_uri(image_id)  # 400 if it resolves outside
        for tag in list(self._datastore.objects[image_id].labels):
            self.get_label_uri(image_id, tag)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._known_image(label_id)
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no label with tag {label_tag!r}")
        super().remove_label(label_id, label_tag)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._plain_tag(label_tag)
        image_uri = self.get_image_uri(self._known_image(image_id))
        label_dir = self._inside(self._datastore.label_path(label_tag), f"label tag {label_tag!r}")
        name = self._filename(image_id, self._to_id(os.path.basename(label_filename))[1])
        self._inside(label_dir / name, f"label of image {image_id!r}")
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
