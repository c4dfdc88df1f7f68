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


def scan_label(data: np.ndarray, path: str | os.PathLike = "label") -> tuple[bool, list[int]]:
    """(uses 255 anywhere, z indices of slices with a membrane voxel), read slab by slab.

    The bundle's label reader (``scripts.io.labels``) checks the values: other than 0, 1 and 255 is a
    LabelError (a VolumeError) naming ``path``.
    """
    from scripts.io.labels import scan_labels

    found = scan_labels(data, path)
    return found.uses_ignore, found.membrane


def read_label(path: str | os.PathLike) -> Any:
    """A label volume, not yet checked; labels often carry no voxel size (the image's is what
    counts): no warning."""
    from scripts.io.volume import open_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_volume(path, allow_2d=True, check_finite=False)


def open_label(path: str | os.PathLike) -> Any:
    """A label volume whose values are checked (LabelError naming the file).

    Checked on upload and when the training folder is built, whatever ``annotated_slices`` says: a
    multi-class label map is refused at once instead of failing a later retrain.
    """
    from scripts.io.labels import scan_labels

    label = read_label(path)
    scan_labels(label.data, path)
    return label


def annotated_slices_for(scan: Any, info: dict[str, Any] | None, n_slices: int) -> list[int] | None:
    """Slices to list in the sidecar, from a label's ``LabelScan``, or None when the label itself says
    (255 or "all")."""
    spec = parse_annotated_spec((info or {}).get(ANNOTATED_KEY), n_slices)
    if spec == "all":
        return None
    if isinstance(spec, list):
        return spec
    return None if scan.uses_ignore else scan.membrane


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


def _checked_uri(uri: str, studies: Path | None, what: str) -> Path:
    """``uri`` resolved; ValueError unless it is a file path inside ``studies`` (when known)."""
    from .safe_paths import inside

    if not uri:
        raise ValueError(f"{what}: the datastore gives no file")
    return inside(uri, studies, what) if studies is not None else Path(uri)


def build_training_folder(
    datastore: DatastoreView, root: str | os.PathLike, studies: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write ``root/images`` and ``root/labels`` (+ sidecars) for every readable study.

    Studies that cannot be opened, and labels that cannot be opened or do not match their image,
    are skipped with a warning (one bad file must not stop a retrain); they are listed in the summary.
    So are studies whose id cannot name a file in ``root`` (an absolute or ``../`` id) and files that
    resolve outside ``studies`` (the datastore folder): only files inside it are linked.
    """
    from scripts.io.labels import scan_labels
    from scripts.io.volume import VolumeError, open_volume, volume_suffix
    from scripts.train.dataset import SIDECAR_SUFFIX

    from .safe_paths import is_link_name

    root = Path(root)
    folder = Path(studies).resolve() if studies is not None else None
    summary: dict[str, Any] = {"labeled": [], "unlabeled": [], "skipped": {}}
    for image_id in sorted(datastore.list_images()):
        try:
            if not is_link_name(image_id):
                raise ValueError(f"id {image_id!r} cannot name a file (a path?)")
            image_uri = _checked_uri(datastore.get_image_uri(image_id), folder, f"image {image_id!r}")
            image = open_volume(image_uri, check_finite=False)
        except (VolumeError, ValueError, OSError) as err:
            summary["skipped"][image_id] = f"image: {err}"
            logger.warning("training: skipping study %s: %s", image_id, err)
            continue
        _link(image_uri, root / "images" / f"{image_id}{volume_suffix(image_uri)}")
        try:
            label_uri = datastore.get_label_uri(image_id, FINAL_TAG)
            if not label_uri:
                summary["unlabeled"].append(image_id)
                continue
            label_path = _checked_uri(label_uri, folder, f"label of {image_id!r}")
            label = read_label(label_path)
            if label.shape != image.shape:
                raise VolumeError(f"{label_uri}: shape {label.shape} differs from the image's {image.shape}")
            scan = scan_labels(label.data, label_path)  # one read: checks the values, finds the slices
            slices = annotated_slices_for(scan, datastore.get_label_info(image_id, FINAL_TAG), label.shape[0])
        except (VolumeError, ValueError, OSError) as err:
            summary["skipped"][image_id] = f"label: {err}"
            summary["unlabeled"].append(image_id)
            logger.warning("training: label of %s not used (the study is unlabeled): %s", image_id, err)
            continue
        if slices == []:
            summary["skipped"][image_id] = "label: no annotated slice (no membrane voxel and no 255)"
            summary["unlabeled"].append(image_id)
            continue
        label_link = root / "labels" / f"{image_id}{volume_suffix(label_path)}"
        _link(label_path, label_link)
        if slices is not None:
            label_link.with_name(image_id + SIDECAR_SUFFIX).write_text(" ".join(map(str, slices)) + "\n")
        summary["labeled"].append(image_id)
    return summary
