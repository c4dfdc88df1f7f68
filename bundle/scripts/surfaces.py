"""The ``surfaces`` workflow: a folder of masks -> per-object surfaces, measurements and pictures.

``python -m monai.bundle run surfaces --config_file bundle/configs/surfaces.json --dataset_dir MASKS
--output_dir OUT`` calls :func:`run`. For each mask (or label) volume ``NAME`` it writes
``OUT/NAME/``: ``objects.csv`` and ``objects.json`` (one row per object), ``summary.json`` (mean and
SD over objects not touching the border), ``surfaces.{ply,stl,obj,glb}`` (all objects, one colour
each), ``meshes/object_NNNN.*`` (one file per object), ``NAME_objects.*`` (the label volume the ids
refer to), ``montage.png`` and ``surfaces_3d.png``; and ``OUT/summary.csv`` with one row per volume.
See docs/surfaces.md.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import measure, meshes, morphology, pictures
from .atomic import output_folder
from .options import as_bool
from .volume_io import (
    MRC_SUFFIXES,
    SliceWriter,
    VolumeError,
    find_volumes,
    iter_slabs,
    open_volume,
    volume_stem,
    volume_suffix,
)

__all__ = ["match_image", "process_volume", "run"]

logger = logging.getLogger(__name__)

DEFAULT_PICTURES = {"montage_slices": 12, "montage_columns": 4, "render_3d": True, "render_max_faces": 60000}

# Per-volume row of OUT/summary.csv: counts, then mean and SD of the paper's measurements.
_VOLUME_STATS = [*measure.PAPER_TABLE.values(), "xs_width_max_nm"]
_VOLUME_COLUMNS = [
    "file",
    "voxel_size_z_nm",
    "voxel_size_y_nm",
    "voxel_size_x_nm",
    "n_objects",
    "n_border",
    "n_measured",
    *(f"{col}_{stat}" for col in _VOLUME_STATS for stat in ("mean", "sd")),
    "status",
]


def _parse_voxel_size(value) -> float | tuple[float, float, float] | None:
    """``None``, a number, a (z, y, x) triple, or their string forms from the command line."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else float(value)
    if isinstance(value, (int, float)):
        return float(value)
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        return vals[0]
    if len(vals) != 3:
        raise ValueError(f"voxel_size_nm must be one number or (z, y, x), got {value!r}")
    return vals


def _parse_formats(formats) -> list[str]:
    if formats is None:
        return []
    if isinstance(formats, str):
        formats = [f for f in formats.replace(";", ",").split(",") if f.strip()]
    out = []
    for f in formats:
        f = str(f).strip().lower().lstrip(".")
        if f not in meshes.MESH_FORMATS:
            raise ValueError(f"unknown mesh format {f!r}; choose from {list(meshes.MESH_FORMATS)}")
        if f not in out:
            out.append(f)
    return out


def match_image(mask_path: Path, images: Sequence[Path]) -> Path | None:
    """The tomogram for a mask: same stem (``cell1.mrc`` for ``cell1.tif``), or the longest image
    stem that starts the mask stem followed by ``_``, ``-`` or ``.`` (``cell1`` for ``cell1_mask``)."""
    stem = volume_stem(mask_path)
    best, best_len = None, -1
    for img in images:
        s = volume_stem(img)
        if s == stem:
            return img
        if stem.startswith(s) and len(stem) > len(s) and stem[len(s)] in "_-." and len(s) > best_len:
            best, best_len = img, len(s)
    return best


def _label_path(folder: Path, mask_path: Path) -> Path:
    suffix = volume_suffix(mask_path)
    suffix = ".mrc" if suffix in MRC_SUFFIXES else suffix
    return folder / f"{volume_stem(mask_path)}_objects{suffix}"


def _write_labels(path: Path, labels: np.ndarray, max_id: int, vol) -> Path:
    """The label volume, as uint8/uint16 when ids fit (Fiji, MIB, IMOD read those), else int32 TIFF."""
    if max_id <= 255:
        dtype = np.uint8
    elif max_id <= 65535:
        dtype = np.uint16
    else:
        dtype = np.int32
        if volume_suffix(path) in MRC_SUFFIXES:  # MRC has no 32-bit integer mode
            path = path.with_suffix(".tif")
    with SliceWriter(path, labels.shape, dtype, vol.voxel_size_nm, like=vol) as writer:
        for start, stop in iter_slabs(labels.shape[0], labels[0].nbytes):
            writer.write(start, labels[start:stop])
    return path


def process_volume(
    path: Path,
    out_dir: Path,
    voxel_size_nm=None,
    image_path: Path | None = None,
    z_closing: str = "none",
    z_radius: int = 2,
    connectivity: int = 3,
    threshold: float = 0.5,
    min_voxels: int = 500,
    border_margin: int = 0,
    smoothing_iterations: int = 25,
    preserve_volume: bool = True,
    formats: Sequence[str] = meshes.MESH_FORMATS,
    per_object_meshes: bool = True,
    save_labels: bool = True,
    pictures_options: dict | None = None,
) -> dict:
    """Surfaces, measurements and pictures of one mask volume into ``out_dir``; returns its summary."""
    t0 = time.perf_counter()
    popts = {**DEFAULT_PICTURES, **(pictures_options or {})}
    vol = open_volume(path, voxel_size_nm)
    if vol.voxel_size_nm is None:
        raise VolumeError(
            f"{path}: the header has no voxel size; pass --voxel_size_nm (nm, one number or [z, y, x])"
        )
    spacing = tuple(float(s) for s in vol.voxel_size_nm)
    logger.info("%s: shape %s, voxel size (z, y, x) %s nm", path.name, vol.shape, spacing)
    objs = morphology.prepare_objects(
        vol.data,
        name=str(path),
        z_closing=z_closing,
        z_radius=z_radius,
        connectivity=connectivity,
        min_voxels=min_voxels,
        border_margin=border_margin,
        threshold=threshold,
    )
    logger.info(
        "%s: %d objects (%s input), %d below %d voxels removed",
        path.name,
        len(objs.objects),
        objs.kind,
        objs.removed_small,
        min_voxels,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = pictures.object_colors([o.label for o in objs.objects], [o.touches_border for o in objs.objects])
    mesh_dir = out_dir / "meshes"
    if per_object_meshes and formats and objs.objects:
        mesh_dir.mkdir(exist_ok=True)
    rows, parts = [], []
    for obj in tqdm(objs.objects, desc=path.name, unit="object", mininterval=1.0):
        crop, origin = morphology.object_crop(objs.labels, obj)
        mesh, raw = meshes.object_surface(crop, spacing, origin, smoothing_iterations, preserve_volume)
        rows.append(measure.measure_object(obj, crop, origin, spacing, mesh, raw, connectivity))
        name = f"object_{obj.label:04d}"
        if per_object_meshes:
            for fmt in formats:
                meshes.export_mesh(mesh, mesh_dir / f"{name}.{fmt}", colors[obj.label], name)
        parts.append((name, mesh, colors[obj.label]))
        del crop

    summary = measure.summarize(rows)
    meta = {
        "file": str(path),
        "shape_zyx": list(vol.shape),
        "voxel_size_nm_zyx": list(spacing),
        "input_kind": objs.kind,
        "notes": objs.notes,
        "options": {
            "z_closing": z_closing,
            "z_radius": z_radius,
            "connectivity": connectivity,
            "threshold": threshold,
            "min_voxels": min_voxels,
            "border_margin": border_margin,
            "smoothing_iterations": smoothing_iterations,
            "preserve_volume": preserve_volume,
        },
        "removed_small_objects": objs.removed_small,
        "units": {
            "length": "nm",
            "area": "nm^2",
            "volume": "nm^3",
            "surface_to_volume": "1/um",
            "bbox": "voxel indices (z, y, x), inclusive",
            "mesh_coordinates": "nm, (x, y, z)",
        },
    }
    measure.write_csv(rows, out_dir / "objects.csv")
    measure.write_json({**meta, "objects": rows}, out_dir / "objects.json")
    measure.write_json({**meta, **summary}, out_dir / "summary.json")
    if parts:
        for fmt in formats:
            meshes.export_scene(parts, out_dir / f"surfaces.{fmt}")
    if save_labels and objs.objects:
        _write_labels(_label_path(out_dir, path), objs.labels, max(o.label for o in objs.objects), vol)

    image = None
    if image_path is not None:
        try:
            img = open_volume(image_path, check_finite=False)
            if img.shape == vol.shape:
                image = img.data
            else:
                logger.warning(
                    "%s: image %s has shape %s, mask %s; montage without the image",
                    path.name,
                    image_path.name,
                    img.shape,
                    vol.shape,
                )
        except VolumeError as err:
            logger.warning("%s: cannot read the image (%s); montage without it", path.name, err)
    n = summary["n_objects"]
    title = (
        f"{path.name}: {n} object{'s' if n != 1 else ''} ({summary['n_border']} touching the border, grey), "
        f"voxel {spacing[2]:g} x {spacing[1]:g} x {spacing[0]:g} nm"
    )
    if int(popts["montage_slices"]) > 0:
        pictures.montage(
            objs.labels,
            spacing,
            out_dir / "montage.png",
            image=image,
            colors=colors,
            n_slices=int(popts["montage_slices"]),
            ncols=int(popts["montage_columns"]),
            title=title + ("" if image is not None else " (no image given: mask only)"),
        )
    if as_bool(popts["render_3d"], "pictures#render_3d") and parts:
        pictures.render_surfaces(
            parts, out_dir / "surfaces_3d.png", title=path.name, max_faces=int(popts["render_max_faces"])
        )
    logger.info("%s: done in %.1f s -> %s", path.name, time.perf_counter() - t0, out_dir)
    return {**meta, **summary}


def _volume_row(summary: dict, status: str = "ok") -> dict:
    row = {c: None for c in _VOLUME_COLUMNS}
    row["file"] = summary.get("file")
    row["status"] = status
    vox = summary.get("voxel_size_nm_zyx") or [None] * 3
    row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"] = vox
    for key in ("n_objects", "n_border", "n_measured"):
        row[key] = summary.get(key)
    stats = summary.get("stats", {})
    for col in _VOLUME_STATS:
        if col in stats:
            row[f"{col}_mean"] = stats[col]["mean"]
            row[f"{col}_sd"] = stats[col]["sd"]
    return row


def run(
    dataset_dir,
    output_dir,
    voxel_size_nm=None,
    image_dir=None,
    z_closing: str = "none",
    z_radius: int = 2,
    connectivity: int = 3,
    threshold: float = 0.5,
    min_voxels: int = 500,
    border_margin: int = 0,
    smoothing_iterations: int = 25,
    preserve_volume: bool = True,
    formats=meshes.MESH_FORMATS,
    per_object_meshes: bool = True,
    save_labels: bool = True,
    pictures: dict | None = None,
    pattern: str = "*",
) -> list[dict]:
    """Process every mask/label volume in ``dataset_dir`` (see the module docstring).

    A volume that cannot be processed is logged and listed with its error in ``summary.csv``; the
    others are still processed, and a RuntimeError naming the failed files is raised at the end.
    Returns the per-volume summaries.
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    voxel_size_nm = _parse_voxel_size(voxel_size_nm)
    formats = _parse_formats(formats)
    preserve_volume = as_bool(preserve_volume, "preserve_volume")
    per_object_meshes = as_bool(per_object_meshes, "per_object_meshes")
    save_labels = as_bool(save_labels, "save_labels")
    if z_closing is None or z_closing is False:
        z_closing = "none"
    z_closing = str(z_closing).lower()
    if z_closing not in morphology.Z_CLOSING_MODES:
        raise ValueError(f"z_closing must be one of {morphology.Z_CLOSING_MODES}, got {z_closing!r}")
    # e.g. "*_mask.mrc": inference writes each mask in several formats into one folder.
    masks = [m for m in find_volumes(dataset_dir) if fnmatch.fnmatch(m.name, pattern)]
    if not masks:
        raise VolumeError(f"{dataset_dir}: no volume matches the pattern {pattern!r}")
    images = find_volumes(image_dir) if image_dir not in (None, "", "none", "null") else []
    output_dir = output_folder(output_dir)
    names: dict[str, int] = {}
    results, rows, failed = [], [], []
    for path in masks:
        stem = volume_stem(path)
        names[stem] = names.get(stem, 0) + 1
        folder = output_dir / (stem if names[stem] == 1 else f"{stem}_{volume_suffix(path).lstrip('.')}")
        image_path = match_image(path, images) if images else None
        if images and image_path is None:
            logger.warning("%s: no matching image in %s; montage shows the mask only", path.name, image_dir)
        try:
            summary = process_volume(
                path,
                folder,
                voxel_size_nm=voxel_size_nm,
                image_path=image_path,
                z_closing=z_closing,
                z_radius=int(z_radius),
                connectivity=int(connectivity),
                threshold=float(threshold),
                min_voxels=int(min_voxels),
                border_margin=int(border_margin),
                smoothing_iterations=int(smoothing_iterations),
                preserve_volume=preserve_volume,
                formats=formats,
                per_object_meshes=per_object_meshes,
                save_labels=save_labels,
                pictures_options=pictures,
            )
        except (VolumeError, morphology.MaskError) as err:
            logger.error("%s", err)
            failed.append(f"{path}: {err}")
            rows.append(_volume_row({"file": str(path)}, status=f"failed: {err}"))
            continue
        results.append(summary)
        rows.append(_volume_row(summary))
    measure.write_csv(rows, output_dir / "summary.csv", columns=_VOLUME_COLUMNS)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(masks)} volumes failed:\n" + "\n".join(failed))
    logger.info("%d volumes processed; summary in %s", len(results), output_dir / "summary.csv")
    return results


if __name__ == "__main__":  # pragma: no cover
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(run, serialize=lambda _: None)  # the summaries are in the output folder, not printed
