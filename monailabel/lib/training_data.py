"""From MONAI Label's datastore to the bundle's training layout (docs/data.md, docs/monailabel.md).

The bundle trains from a folder ``images/`` + ``labels/`` (+ ``NAME.slices.txt`` sidecars listing
the annotated slices); images without a label are the unlabeled tomograms of the reconstruction
branch. ``build_training_folder`` writes that folder as symlinks to the datastore's files, so the
bundle's own ``prepare_data`` (annotated slices only, validation split, unlabeled slices) does the rest.

Which slices of a label count as annotated:
- a label that uses 255 anywhere follows the bundle's convention (255 = not annotated);
- otherwise (a 0/1 labelmap as 3D Slicer saves it) only slices with some membrane are annotated:
  untouched slices are all 0 and must not teach the network "no membrane here";
- the label's info ``annotated_slices`` (the ``params`` of PUT /datastore/label) overrides this:
  ``"all"`` or a slice list such as ``"0-4, 9, 12"`` (z indices, as in the bundle's sidecars).

Bundle modules (``scripts.*``) are imported inside functions: the app puts the working bundle on
``sys.path`` only when it starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

FINAL_TAG = "final"
ANNOTATED_KEY = "annotated_slices"


class DatastoreView(Protocol):
    """The part of MONAI Label's Datastore API used here."""

    def list_images(self) -> list[str]: ...
    def get_image_uri(self, image_id: str) -> str: ...
    def get_label_uri(self, label_id: str, label_tag: str) -> str: ...
    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]: ...


def parse_annotated_spec(spec: Any, n_slices: int) -> list[int] | str:
    """``"auto"`` (default), ``"all"`` or the sorted z indices of a slice list; ValueError if invalid."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto", "nonempty")):
        return "auto"
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return "all"
    from scripts.options import parse_slice_ranges

    tokens: Iterable[Any] = spec if isinstance(spec, (list, tuple)) else str(spec).replace(",", " ").split()
    try:
        return parse_slice_ranges(tokens, n_slices)
    except ValueError as err:
        raise ValueError(f"{ANNOTATED_KEY}: {err}") from None


def scan_label(data: np.ndarray) -> tuple[bool, list[int]]:
    """(uses 255 anywhere, z indices of slices with a membrane voxel), read slab by slab."""
    from scripts.io.volume import iter_slabs
    from scripts.train.labels import IGNORE_VALUE

    uses_ignore, nonempty = False, []
    for start, stop in iter_slabs(data.shape[0], data[0].nbytes):
        block = np.asarray(data[start:stop])
        if block.dtype == np.int8:  # MRC mode 0 without the IMOD unsigned flag: 255 reads as -1
            block = block.view(np.uint8)
        ignore = block == IGNORE_VALUE
        uses_ignore |= bool(ignore.any())
        membrane = (block != 0) & ~ignore
        nonempty.extend(int(start + i) for i in np.flatnonzero(membrane.any(axis=(1, 2))))
    return uses_ignore, nonempty


def open_label(path: str | os.PathLike) -> Any:
    """A label volume; labels often carry no voxel size (the image's is what counts): no warning."""
    from scripts.io.volume import open_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_volume(path, allow_2d=True, check_finite=False)


def annotated_slices_for(label: Any, info: dict[str, Any] | None) -> list[int] | None:
    """Slices of an opened label to list in the sidecar, or None when the label itself says (255 or "all")."""
    spec = parse_annotated_spec((info or {}).get(ANNOTATED_KEY), label.shape[0])
    if spec == "all":
        return None
    if isinstance(spec, list):
        return spec
    uses_ignore, nonempty = scan_label(label.data)
    return None if uses_ignore else nonempty


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target)
    except OSError:  # filesystems without symlinks: a hard link, else a copy
        try:
            os.link(target, link)
        except OSError:
            import shutil

            shutil.copy2(target, link)


def build_training_folder(datastore: DatastoreView, root: str | os.PathLike) -> dict[str, Any]:
    """Write ``root/images`` and ``root/labels`` (+ sidecars) for every readable study.

    Studies that cannot be opened, and labels that cannot be opened or do not match their image,
    are skipped with a warning (one bad file must not stop a retrain); they are listed in the summary.
    """
    from scripts.io.volume import VolumeError, open_volume, volume_suffix
    from scripts.train.dataset import SIDECAR_SUFFIX

    root = Path(root)
    summary: dict[str, Any] = {"labeled": [], "unlabeled": [], "skipped": {}}
    for image_id in sorted(datastore.list_images()):
        image_uri = datastore.get_image_uri(image_id)
        try:
            image = open_volume(image_uri, check_finite=False)
        except (VolumeError, OSError) as err:
            summary["skipped"][image_id] = f"image: {err}"
            logger.warning("training: skipping study %s: %s", image_id, err)
            continue
        _link(Path(image_uri), root / "images" / f"{image_id}{volume_suffix(image_uri)}")
        label_uri = datastore.get_label_uri(image_id, FINAL_TAG)
        if not label_uri:
            summary["unlabeled"].append(image_id)
            continue
        try:
            label = open_label(label_uri)
            if label.shape != image.shape:
                raise VolumeError(f"{label_uri}: shape {label.shape} differs from the image's {image.shape}")
            slices = annotated_slices_for(label, datastore.get_label_info(image_id, FINAL_TAG))
        except (VolumeError, ValueError, OSError) as err:
            summary["skipped"][image_id] = f"label: {err}"
            summary["unlabeled"].append(image_id)
            logger.warning("training: label of %s not used (the study is unlabeled): %s", image_id, err)
            continue
        if slices == []:
            summary["skipped"][image_id] = "label: no annotated slice (no membrane voxel and no 255)"
            summary["unlabeled"].append(image_id)
            continue
        label_link = root / "labels" / f"{image_id}{volume_suffix(label_uri)}"
        _link(Path(label_uri), label_link)
        if slices is not None:
            label_link.with_name(image_id + SIDECAR_SUFFIX).write_text(" ".join(map(str, slices)) + "\n")
        summary["labeled"].append(image_id)
    return summary
