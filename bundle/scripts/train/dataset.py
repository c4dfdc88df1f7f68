"""Training data layout: ``D/images``, ``D/labels`` (+ optional ``NAME.slices.txt``), ``D/unlabeled``.

Label convention (docs/data.md, checked by ``scripts.io.labels``): membrane = 1, not annotated = 255,
background = 0; other values are refused naming the file. An all-255 slice is unannotated and never used.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from scripts.io.labels import scan_labels
from scripts.io.volume import (
    VolumeError,
    find_volumes,
    open_volume,
    volume_stem,
)
from scripts.options import parse_slice_ranges

__all__ = [
    "LabeledVolume",
    "annotated_slices",
    "list_training_data",
    "read_slice_list",
    "slice_items",
    "slice_items_unlabeled",
    "split_by_file",
]

SIDECAR_SUFFIX = ".slices.txt"
T = TypeVar("T")


@dataclass
class LabeledVolume:
    """An image with its label volume and the z indices that carry annotation."""

    image: Path
    label: Path
    annotated_slices: list[int]


def read_slice_list(path: str | os.PathLike, n_slices: int) -> list[int]:
    """Parse a sidecar of z indices: ints or inclusive ranges ``a-b``, by line/comma/space, ``#`` comments."""
    path = Path(path)
    found: set[int] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split("#", 1)[0].replace(",", " ").split()
        try:
            found.update(parse_slice_ranges(tokens, n_slices))
        except ValueError as err:
            raise VolumeError(f"{path}, line {lineno}: {err}") from None
    return sorted(found)


def annotated_slices(
    label: np.ndarray, candidates: Sequence[int] | None = None, path: str | os.PathLike = "label"
) -> list[int]:
    """Indices (of ``candidates``, default all) whose label slice is not entirely IGNORE_VALUE.

    The slices read are checked (``scripts.io.labels``): a value other than 0, 1 and 255 raises a
    LabelError naming ``path``, before any training starts.
    """
    return scan_labels(label, path, candidates).annotated


def _scan(folder: Path) -> list[Path]:
    """Volumes in an optional folder: [] when it is missing or empty."""
    if not folder.is_dir():
        return []
    try:
        return find_volumes(folder)
    except VolumeError:
        return []


def _index_by_stem(paths: list[Path]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for p in paths:
        stem = volume_stem(p)
        if stem in by_stem:
            raise VolumeError(f"{by_stem[stem]} and {p}: two files with the same name {stem!r}")
        by_stem[stem] = p
    return by_stem


def list_training_data(dataset_dir: str | os.PathLike) -> tuple[list[LabeledVolume], list[Path]]:
    """(labeled, unlabeled) volumes of a dataset folder; reads headers and label volumes only.

    Images without a label file, and labeled images with no annotated slice (with a warning), count
    as unlabeled, as do the files in ``unlabeled/``.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise VolumeError(f"{root}: dataset folder does not exist")
    images = _index_by_stem(_scan(root / "images"))
    labels = _index_by_stem(_scan(root / "labels"))
    orphans = sorted(str(p) for stem, p in labels.items() if stem not in images)
    if orphans:
        raise VolumeError(f"{root / 'images'}: no image for label file(s) {', '.join(orphans)}")

    labeled: list[LabeledVolume] = []
    unlabeled: list[Path] = []
    for stem, image_path in images.items():
        label_path = labels.get(stem)
        if label_path is None:
            unlabeled.append(image_path)
            continue
        item = _labeled_volume(image_path, label_path)
        if item.annotated_slices:
            labeled.append(item)
        else:
            msg = f"{label_path}: no annotated slice; {image_path.name} is used as unlabeled"
            warnings.warn(msg, stacklevel=2)
            unlabeled.append(image_path)
    unlabeled.extend(_scan(root / "unlabeled"))
    if not labeled and not unlabeled:
        raise VolumeError(f"{root}: no usable data (expected images/, labels/ and/or unlabeled/ volumes)")
    return labeled, unlabeled


def _labeled_volume(image_path: Path, label_path: Path) -> LabeledVolume:
    image = open_volume(image_path, allow_2d=True, check_finite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels often carry no voxel size; the image's is what counts
        label = open_volume(label_path, allow_2d=True, check_finite=False)
    if label.shape != image.shape:
        raise VolumeError(
            f"label {label_path} has shape {label.shape} but image {image_path} has shape "
            f"{image.shape}; they must match"
        )
    sidecar = label_path.with_name(volume_stem(label_path) + SIDECAR_SUFFIX)
    candidates = read_slice_list(sidecar, label.shape[0]) if sidecar.is_file() else None
    return LabeledVolume(image_path, label_path, annotated_slices(label.data, candidates, label_path))


def split_by_file(items: Sequence[T], fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """Random (train, val) split of whole files; at least one val item when there are >= 2 items.

    ``fraction <= 0`` gives no validation items. Both lists keep the input order.
    """
    n = len(items)
    n_val = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val


def slice_items(labeled: Sequence[LabeledVolume]) -> list[dict[str, str | int]]:
    """One ``{"image", "label", "z"}`` dict per annotated slice (paths as str for MONAI collation)."""
    return [
        {"image": str(item.image), "label": str(item.label), "z": int(z)}
        for item in labeled
        for z in item.annotated_slices
    ]


def slice_items_unlabeled(paths: Sequence[str | os.PathLike]) -> list[dict[str, str | int]]:
    """One ``{"image", "z"}`` dict per slice of each volume (headers are opened to count slices)."""
    items: list[dict[str, str | int]] = []
    for path in paths:
        n_slices = open_volume(path, allow_2d=True, check_finite=False).shape[0]
        items.extend({"image": str(path), "z": z} for z in range(n_slices))
    return items
