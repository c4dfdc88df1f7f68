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

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scripts.io.atomic import output_folder
from scripts.io.volume import (
    MRC_SUFFIXES,
    SliceWriter,
    VolumeError,
    find_volumes,
    iter_slabs,
    open_volume,
    volume_stem,
    volume_suffix,
)
from scripts.options import as_optional
from scripts.surfaces import measure, meshes, morphology, pictures
from scripts.surfaces.options import SurfaceOptions
from tqdm import tqdm

__all__ = ["SurfaceOptions", "match_image", "process_volume", "run"]

logger = logging.getLogger(__name__)

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
    path: Path, out_dir: Path, options: SurfaceOptions | None = None, image_path: Path | None = None
) -> dict:
    """Surfaces, measurements and pictures of one mask volume into ``out_dir``; returns its summary."""
    t0 = time.perf_counter()
    options = options or SurfaceOptions()
    objects, mesh_options, popts = options.objects, options.meshes, options.pictures
    vol = open_volume(path, options.voxel_size_nm)
    if vol.voxel_size_nm is None:
        raise VolumeError(f"{path}: the header has no voxel size; pass --voxel_size_nm (nm, one number or [z, y, x])")
    spacing = tuple(float(s) for s in vol.voxel_size_nm)
    logger.info("%s: shape %s, voxel size (z, y, x) %s nm", path.name, vol.shape, spacing)
    objs = morphology.prepare_objects(vol.data, name=str(path), **dataclasses.asdict(objects))
    logger.info(
        "%s: %d objects (%s input), %d below %d voxels removed",
        path.name,
        len(objs.objects),
        objs.kind,
        objs.removed_small,
        objects.min_voxels,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = pictures.object_colors([o.label for o in objs.objects], [o.touches_border for o in objs.objects])
    formats, per_object_meshes = mesh_options.formats, mesh_options.per_object_meshes
    mesh_dir = out_dir / "meshes"
    if per_object_meshes and formats and objs.objects:
        mesh_dir.mkdir(exist_ok=True)
    rows, parts = [], []
    for obj in tqdm(objs.objects, desc=path.name, unit="object", mininterval=1.0):
        crop, origin = morphology.object_crop(objs.labels, obj)
        mesh, raw = meshes.object_surface(
            crop, spacing, origin, mesh_options.smoothing_iterations, mesh_options.preserve_volume
        )
        rows.append(measure.measure_object(obj, crop, origin, spacing, mesh, raw, objects.connectivity))
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
            **dataclasses.asdict(objects),
            "smoothing_iterations": mesh_options.smoothing_iterations,
            "preserve_volume": mesh_options.preserve_volume,
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
    if options.save_labels and objs.objects:
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
    if popts.montage_slices > 0:
        pictures.montage(
            objs.labels,
            spacing,
            out_dir / "montage.png",
            image=image,
            colors=colors,
            n_slices=popts.montage_slices,
            ncols=popts.montage_columns,
            title=title + ("" if image is not None else " (no image given: mask only)"),
        )
    if popts.render_3d and parts:
        faces = popts.render_max_faces
        pictures.render_surfaces(parts, out_dir / "surfaces_3d.png", title=path.name, max_faces=faces)
    logger.info("%s: done in %.1f s -> %s", path.name, time.perf_counter() - t0, out_dir)
    return {**meta, **summary}


def _volume_row(summary: dict, status: str = "ok") -> dict:
    row = dict.fromkeys(_VOLUME_COLUMNS)
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
    dataset_dir: str | Path,
    output_dir: str | Path,
    options: SurfaceOptions | None = None,
    image_dir: str | Path | None = None,
    pattern: str = "*",
    **settings: Any,
) -> list[dict]:
    """Process every mask/label volume in ``dataset_dir`` (see the module docstring).

    A volume that cannot be processed is logged and listed with its error in ``summary.csv``; the
    others are still processed, and a RuntimeError naming the failed files is raised at the end.
    Returns the per-volume summaries. ``options`` (configs/surfaces.json builds it) or, from Python
    and the command line, flat ``settings`` named as the fields of the parts of
    :class:`SurfaceOptions` (``min_voxels=20, formats=["glb"], voxel_size_nm=9.8``...).
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    if options is not None and settings:
        raise TypeError(f"give options or settings, not both (settings: {sorted(settings)})")
    options = options if options is not None else SurfaceOptions.from_settings(**settings)
    image_dir = as_optional(image_dir)
    # e.g. "*_mask.mrc": inference writes each mask in several formats into one folder.
    masks = [m for m in find_volumes(dataset_dir) if fnmatch.fnmatch(m.name, pattern)]
    if not masks:
        raise VolumeError(f"{dataset_dir}: no volume matches the pattern {pattern!r}")
    images = find_volumes(image_dir) if image_dir is not None else []
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
            summary = process_volume(path, folder, options, image_path=image_path)
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
