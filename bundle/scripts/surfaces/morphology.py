"""Mask clean-up before surfaces: mask checks, z-closing, 3D objects, size filter, border flags.

Everything here works on boolean or int32 arrays, slab by slab along z where a whole-volume
temporary would be needed, so that a 400 x 1324 x 1284 mask never gets a float copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scripts.io.volume import iter_slabs

__all__ = [
    "MaskError",
    "ObjectInfo",
    "Objects",
    "Z_CLOSING_MODES",
    "find_objects",
    "inspect_mask",
    "label_components",
    "object_crop",
    "prepare_objects",
    "to_binary",
    "z_close",
]

logger = logging.getLogger(__name__)

Z_CLOSING_MODES = ("none", "or", "closing")
MAX_DIRECT_LABEL = 2**24  # larger label ids are renumbered


class MaskError(ValueError):
    """A volume that cannot be used as a mask or label volume."""


@dataclass
class ObjectInfo:
    """One 3D object: its id in the label volume, tight bounding box and voxel count."""

    label: int
    bbox: tuple[slice, slice, slice]
    voxel_count: int
    touches_border: bool

    @property
    def bbox_min(self) -> tuple[int, int, int]:
        return tuple(int(s.start) for s in self.bbox)

    @property
    def bbox_max(self) -> tuple[int, int, int]:
        """Last voxel inside the box along (z, y, x), inclusive."""
        return tuple(int(s.stop) - 1 for s in self.bbox)


@dataclass
class Objects:
    """The label volume and the objects kept in it (label 0 is background)."""

    labels: np.ndarray
    objects: list[ObjectInfo]
    kind: str  # "binary" (components computed here) or "labels" (instance labels given)
    removed_small: int = 0
    notes: list[str] = field(default_factory=list)


def _slabs(array: np.ndarray) -> Iterator[slice]:
    """Index slices of whole z slices, as large as ``iter_slabs`` makes them (one slab policy)."""
    slice_bytes = array.nbytes // max(1, array.shape[0])
    return (slice(start, stop) for start, stop in iter_slabs(array.shape[0], slice_bytes))


def inspect_mask(data: np.ndarray, name: str = "volume") -> dict:
    """Look at the values of a mask volume, slab by slab (no whole-volume copies).

    Returns ``{"kind": "binary" | "labels" | "soft", "min", "max", "values"}`` where
    ``values`` lists the distinct values of a binary mask (empty otherwise):

    - ``binary``: at most two distinct integer values (0/1, 0/255, False/True, -1/+1 ...);
      foreground is the larger value.
    - ``labels``: more than two distinct integer values (int dtype, or float with integer values);
      0 is background and each other value is one object.
    - ``soft``: float values that are not all integers, inside [-1, 1] (probabilities, tanh
      output); foreground is above a threshold (see :func:`to_binary`).

    Raises :class:`MaskError` naming ``name`` for float data outside [-1, 1] with fractional
    values (that is an image, not a mask), for NaN, and for complex or non-numeric data.
    """
    dt = np.dtype(data.dtype)
    if dt.kind not in "biuf":
        raise MaskError(f"{name}: data type {dt} cannot be a mask (expected bool, integers or floats)")
    if data.size == 0:
        return {"kind": "binary", "min": 0, "max": 0, "values": [0]}
    is_float = dt.kind == "f"
    vmin, vmax = None, None
    values: set = set()
    fractional = many = False
    for sl in _slabs(data):
        chunk = np.asarray(data[sl])
        if is_float and np.isnan(chunk).any():
            raise MaskError(f"{name}: the mask contains NaN values")
        cmin, cmax = chunk.min(), chunk.max()
        vmin = cmin if vmin is None else min(vmin, cmin)
        vmax = cmax if vmax is None else max(vmax, cmax)
        if is_float and not fractional and not np.array_equal(chunk, np.round(chunk)):
            fractional = True
        if not many:  # two passes of comparisons instead of sorting (np.unique) every slab
            if cmin == cmax:
                values.add(cmin.item())
            elif np.count_nonzero(chunk == cmin) + np.count_nonzero(chunk == cmax) == chunk.size:
                values.update((cmin.item(), cmax.item()))
            else:
                many = True
            many = many or len(values) > 2
    if fractional:
        if vmin < -1.0 or vmax > 1.0:
            raise MaskError(
                f"{name}: float values from {float(vmin):g} to {float(vmax):g} with fractions; this looks "
                "like an image, not a mask (expected a binary mask, label volume or probabilities in [0, 1])"
            )
        kind = "soft"
    elif not many:
        kind = "binary"
    else:
        kind = "labels"
    return {"kind": kind, "min": vmin.item(), "max": vmax.item(), "values": [] if many else sorted(values)}


def to_binary(data: np.ndarray, name: str = "volume", threshold: float = 0.5, info: dict | None = None):
    """Boolean foreground of a mask, filled slab by slab.

    Binary masks: the larger of the two values is foreground (0/1, 0/255, -1/+1). Soft float masks
    are thresholded at ``threshold`` with a warning naming the file. Label volumes: every non-zero
    voxel is foreground.
    """
    info = inspect_mask(data, name) if info is None else info
    out = np.empty(data.shape, dtype=bool)
    kind = info["kind"]
    if kind == "soft":
        logger.warning(
            "%s: not a binary mask (float values from %g to %g); thresholding at %g",
            name,
            info["min"],
            info["max"],
            threshold,
        )
    for sl in _slabs(data):
        chunk = np.asarray(data[sl])
        if kind == "soft":
            np.greater(chunk, threshold, out=out[sl])
        elif kind == "binary":
            lo = info["values"][0]
            if len(info["values"]) == 1:  # a constant volume: all background unless it is all > 0
                out[sl] = chunk > 0
            else:
                np.greater(chunk, lo, out=out[sl])
        else:
            np.not_equal(chunk, 0, out=out[sl])
    return out


def z_close(mask: np.ndarray, mode: str = "none", radius: int = 2) -> np.ndarray:
    """Join slice-wise segmentations along z.

    - ``"none"``: unchanged.
    - ``"or"``: the reference code's step: each slice becomes the OR of itself and its ``radius``
      neighbours on either side (a dilation along z by ``radius``; objects grow by ``radius``
      slices at their top and bottom).
    - ``"closing"``: binary closing along z with a line of ``2 * radius + 1`` slices (dilation then
      erosion): gaps of up to ``2 * radius`` slices are filled and objects do not grow. Computed
      with the volume padded by ``radius`` empty slices so the first and last slices are not eroded.
    """
    if mode not in Z_CLOSING_MODES:
        raise ValueError(f"z_closing must be one of {Z_CLOSING_MODES}, got {mode!r}")
    radius = int(radius)
    if mode == "none" or radius <= 0 or mask.shape[0] == 0:
        return mask
    size = 2 * radius + 1
    if mode == "or":
        return ndimage.maximum_filter1d(mask, size, axis=0, mode="constant", cval=0)
    padded = np.zeros((mask.shape[0] + 2 * radius,) + mask.shape[1:], dtype=bool)
    padded[radius:-radius] = mask
    ndimage.maximum_filter1d(padded, size, axis=0, output=padded, mode="constant", cval=0)
    ndimage.minimum_filter1d(padded, size, axis=0, output=padded, mode="constant", cval=1)
    return np.ascontiguousarray(padded[radius:-radius])


def label_components(mask: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """3D connected components as int32 labels 1..n (1: faces, 2: +edges, 3: +corners = 26-neighbours)."""
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = ndimage.label(mask, structure=structure, output=labels)
    return labels, int(n)


def _voxel_counts(labels: np.ndarray, n: int) -> np.ndarray:
    counts = np.zeros(n + 1, dtype=np.int64)
    for sl in _slabs(labels):
        counts += np.bincount(labels[sl].ravel(), minlength=n + 1)[: n + 1]
    return counts


def _touches(bbox: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> bool:
    return any(s.start <= margin or s.stop >= n - margin for s, n in zip(bbox, shape, strict=True))


def find_objects(labels: np.ndarray, border_margin: int = 0) -> list[ObjectInfo]:
    """Objects of an int label volume (ids > 0), with bounding boxes, sizes and border flags.

    An object touches the border when any of its voxels lies within ``border_margin`` voxels of
    one of the six faces of the volume (``0``: on the outermost slice, row or column).
    """
    if labels.size == 0:
        return []
    n = int(labels.max())
    if n <= 0:
        return []
    boxes = ndimage.find_objects(labels, max_label=n)
    counts = _voxel_counts(labels, n)
    return [
        ObjectInfo(
            label=i + 1,
            bbox=tuple(box),
            voxel_count=int(counts[i + 1]),
            touches_border=_touches(box, labels.shape, int(border_margin)),
        )
        for i, box in enumerate(boxes)
        if box is not None
    ]


def _relabel_in_place(labels: np.ndarray, lut: np.ndarray) -> None:
    for sl in _slabs(labels):
        labels[sl] = lut[labels[sl]]


def prepare_objects(
    data: np.ndarray,
    name: str = "volume",
    z_closing: str = "none",
    z_radius: int = 2,
    connectivity: int = 3,
    min_voxels: int = 0,
    border_margin: int = 0,
    threshold: float = 0.5,
) -> Objects:
    """From a mask or label volume to a cleaned label volume and its list of objects.

    Binary (or soft, thresholded) masks: optional z-closing, 3D connected components, objects with
    fewer than ``min_voxels`` voxels removed, the others numbered 1..n in scan order (z, y, x of
    their first voxel). Label volumes (more than two distinct values): the given ids are kept,
    objects below ``min_voxels`` are set to 0, z-closing is not applied (it would merge labels).
    """
    info = inspect_mask(data, name)
    notes: list[str] = []
    if info["kind"] == "labels":
        if info["min"] < 0:
            raise MaskError(f"{name}: label volume with negative values (min {info['min']})")
        labels = np.empty(data.shape, dtype=np.int32)
        # sparse huge ids: number them 1..n (bincount/find_objects need it)
        if info["max"] > MAX_DIRECT_LABEL:
            ids = np.unique(np.concatenate([np.unique(np.asarray(data[sl])) for sl in _slabs(data)]))
            for sl in _slabs(data):
                labels[sl] = np.searchsorted(ids, np.asarray(data[sl])) + (0 if ids[0] == 0 else 1)
            notes.append(f"label ids above {MAX_DIRECT_LABEL} were renumbered 1..n in increasing order")
        else:
            for sl in _slabs(data):
                labels[sl] = np.asarray(data[sl])
        if z_closing != "none":
            notes.append("z-closing skipped: the input is a label volume")
            logger.warning("%s: label volume given; z_closing=%r is not applied", name, z_closing)
        objects = find_objects(labels, border_margin)
        small = [o for o in objects if o.voxel_count < min_voxels]
        if small:
            # objects are in id order: the last is the largest id (no second scan of the volume)
            lut = np.arange(objects[-1].label + 1, dtype=np.int32)
            lut[[o.label for o in small]] = 0
            _relabel_in_place(labels, lut)
        kept = [o for o in objects if o.voxel_count >= min_voxels]
        return Objects(labels, kept, "labels", removed_small=len(small), notes=notes)

    mask = to_binary(data, name, threshold=threshold, info=info)
    if info["kind"] == "soft":
        notes.append(f"soft mask thresholded at {threshold:g}")
    mask = z_close(mask, z_closing, z_radius)
    labels, n = label_components(mask, connectivity)
    del mask
    objects = find_objects(labels, border_margin)
    kept = [o for o in objects if o.voxel_count >= min_voxels]
    removed = len(objects) - len(kept)
    if removed:
        lut = np.zeros(n + 1, dtype=np.int32)
        for new, o in enumerate(kept, start=1):
            lut[o.label] = new
            o.label = new
        _relabel_in_place(labels, lut)
    return Objects(labels, kept, "binary", removed_small=removed, notes=notes)


def object_crop(labels: np.ndarray, obj: ObjectInfo) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Boolean mask of one object in its bounding box plus an empty one-voxel frame on every side.

    Returns the framed crop and the voxel index (z, y, x) of its first element in the volume
    (one less than the box start; may be -1). The frame closes surfaces at the volume border.
    """
    shape = tuple(s.stop - s.start + 2 for s in obj.bbox)
    crop = np.zeros(shape, dtype=bool)
    np.equal(labels[obj.bbox], obj.label, out=crop[1:-1, 1:-1, 1:-1])
    return crop, tuple(int(s.start) - 1 for s in obj.bbox)
