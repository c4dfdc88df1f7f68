"""The surfaces workflow: mask checks, z-closing, objects, border flags, exports, pictures, bundle command."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import mrcfile
import numpy as np
import pytest
import tifffile
import trimesh
from scripts.io.volume import open_volume
from scripts.surfaces.meshes import MESH_FORMATS, load_mesh
from scripts.surfaces.morphology import (
    MaskError,
    inspect_mask,
    label_components,
    prepare_objects,
    to_binary,
    z_close,
)
from scripts.surfaces.workflow import match_image, run

REPO = Path(__file__).resolve().parent.parent
VOXEL_NM = 9.8


def _ball(shape, centre, radius_vox):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius_vox**2


def scene_mask(shape=(24, 48, 64)):
    """Two inner objects (a ball and a rod along x), one ball cut by the y=0 face, one 2-voxel speck."""
    m = _ball(shape, (12, 14, 14), 6)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    xc = np.clip(x, 30, 52)
    m |= (z - 11) ** 2 + (y - 34) ** 2 + (x - xc) ** 2 <= 4**2
    m |= _ball(shape, (12, 0, 40), 5)
    m[3, 40, 5:7] = True
    return m.astype(np.uint8)


def write_mrc(path, data, voxel_nm=VOXEL_NM):
    with mrcfile.new(path, overwrite=True) as f:
        f.set_data(data)
        f.voxel_size = voxel_nm * 10.0  # Angstrom
    return path


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _no_partial_files(folder):
    return not [p for p in Path(folder).rglob("*") if ".partial-" in p.name]


# ----------------------------------------------------------------------------- mask checks


def test_binary_masks_of_any_coding():
    assert inspect_mask(np.array([[[0, 255]]], np.uint8))["kind"] == "binary"
    assert to_binary(np.array([[[0, 255, 255]]], np.uint8)).tolist() == [[[False, True, True]]]
    assert to_binary(np.array([[[-1.0, 1.0]]], np.float32)).tolist() == [[[False, True]]]
    assert inspect_mask(np.zeros((3, 4, 4), bool))["kind"] == "binary"


def test_soft_float_mask_is_thresholded_with_a_message_naming_the_file(caplog):
    soft = np.array([[[0.1, 0.49, 0.51, 0.9]]], np.float32)
    with caplog.at_level(logging.WARNING):
        out = to_binary(soft, name="cell7_prob.tif")
    assert out.tolist() == [[[False, False, True, True]]]
    assert "cell7_prob.tif" in caplog.text and "thresholding at 0.5" in caplog.text


def test_float_image_is_refused_naming_the_file():
    image = np.random.default_rng(0).normal(100.0, 20.0, (4, 8, 8)).astype(np.float32)
    with pytest.raises(MaskError, match="tomo3.mrc.*looks like an image"):
        inspect_mask(image, "tomo3.mrc")


def test_label_volumes_keep_their_ids():
    labels = np.zeros((10, 12, 12), np.uint16)
    labels[2:5, 2:5, 2:5] = 7
    labels[6:9, 6:9, 6:9] = 9
    labels[1, 10, 10] = 3  # 1 voxel, below min_voxels
    assert inspect_mask(labels)["kind"] == "labels"
    assert inspect_mask(labels.astype(np.float32))["kind"] == "labels"  # float label volumes (NIfTI)
    objs = prepare_objects(labels, min_voxels=2)
    assert objs.kind == "labels"
    assert [o.label for o in objs.objects] == [7, 9]
    assert objs.removed_small == 1 and not (objs.labels == 3).any()


# ----------------------------------------------------------------------------- morphology


def test_z_or_dilates_and_z_closing_fills_gaps_without_growing():
    m = np.zeros((14, 3, 3), bool)
    m[5, 1, 1] = True
    assert np.flatnonzero(z_close(m, "or", 2)[:, 1, 1]).tolist() == [3, 4, 5, 6, 7]
    assert np.flatnonzero(z_close(m, "closing", 2)[:, 1, 1]).tolist() == [5]
    gap = np.zeros((14, 3, 3), bool)
    gap[[2, 6], 1, 1] = True  # 3 empty slices between: filled by a closing with radius 2
    gap[[0, 13], 0, 0] = True  # on the first / last slice: not eroded by the closing
    gap[[7, 12], 2, 2] = True  # 4 empty slices: filled (2 * radius)
    closed = z_close(gap, "closing", 2)
    assert np.flatnonzero(closed[:, 1, 1]).tolist() == [2, 3, 4, 5, 6]
    assert np.flatnonzero(closed[:, 0, 0]).tolist() == [0, 13]
    assert np.flatnonzero(closed[:, 2, 2]).tolist() == list(range(7, 13))
    wide = np.zeros((14, 3, 3), bool)
    wide[[2, 8], 1, 1] = True  # 5 empty slices: stays open
    assert np.flatnonzero(z_close(wide, "closing", 2)[:, 1, 1]).tolist() == [2, 8]
    with pytest.raises(ValueError, match="z_closing"):
        z_close(m, "dilate")


def test_connectivity():
    m = np.zeros((3, 3, 3), bool)
    m[0, 0, 0] = m[1, 1, 1] = True
    assert label_components(m, 1)[1] == 2
    assert label_components(m, 3)[1] == 1


def test_small_objects_removed_at_the_threshold_and_border_flags():
    m = np.zeros((20, 20, 20), np.uint8)
    m[5:8, 5:8, 5:8] = 1  # 27 voxels, inside
    m[12:14, 12:14, 12:14] = 1  # 8 voxels, inside
    m[0:3, 15:18, 15:18] = 1  # 27 voxels, on the z=0 face
    m[10:13, 2:5, 15:18] = 1  # 27 voxels, 2 voxels from the y=0 face
    objs = prepare_objects(m, min_voxels=8)
    assert sorted(o.voxel_count for o in objs.objects) == [8, 27, 27, 27]
    assert [o.label for o in objs.objects] == [1, 2, 3, 4]  # renumbered 1..n
    objs = prepare_objects(m, min_voxels=9)
    assert objs.removed_small == 1 and len(objs.objects) == 3
    assert sorted(objs.labels[objs.labels > 0].tolist()) == sorted(
        sum(([o.label] * o.voxel_count for o in objs.objects), [])
    )
    border = {o.bbox_min: o.touches_border for o in objs.objects}
    assert border == {(5, 5, 5): False, (0, 15, 15): True, (10, 2, 15): False}
    margin = {o.bbox_min: o.touches_border for o in prepare_objects(m, min_voxels=9, border_margin=2).objects}
    assert margin == {(5, 5, 5): False, (0, 15, 15): True, (10, 2, 15): True}
    assert prepare_objects(m, min_voxels=28).objects == []


def test_enclosing_objects_are_found_for_the_3d_picture():
    from scripts.surfaces.pictures import _enclosing

    cell = [[0, 0, 0], [100, 100, 50]]
    inside = [[40, 40, 20], [50, 50, 30]]
    outside = [[120, 0, 0], [130, 10, 10]]
    assert _enclosing([cell, inside, outside]).tolist() == [True, False, False]


def test_match_image_by_name():
    images = [Path("cell1.mrc"), Path("cell10.mrc"), Path("cell1_b.tif")]
    assert match_image(Path("cell1.tif"), images) == Path("cell1.mrc")
    assert match_image(Path("cell1_mask.tif"), images) == Path("cell1.mrc")
    assert match_image(Path("cell1_b_labels.nii.gz"), images) == Path("cell1_b.tif")
    assert match_image(Path("cell2_mask.tif"), images) is None


# ----------------------------------------------------------------------------- workflow


def test_workflow_outputs_measurements_meshes_and_pictures(tmp_path):
    masks, images, out = tmp_path / "masks", tmp_path / "images", tmp_path / "out"
    masks.mkdir()
    images.mkdir()
    mask = scene_mask()
    write_mrc(masks / "cellA_mask.mrc", mask)
    tomogram = (np.random.default_rng(1).normal(0, 1, mask.shape) - 2.0 * mask).astype(np.float32)
    write_mrc(images / "cellA.mrc", tomogram)
    results = run(masks, out, image_dir=images, min_voxels=20, smoothing_iterations=10)
    assert len(results) == 1
    folder = out / "cellA_mask"
    rows = _read_csv(folder / "objects.csv")
    assert len(rows) == 3  # the 2-voxel speck is removed
    assert [r["touches_border"] for r in rows] == ["false", "true", "false"]  # ids in scan order
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["n_objects"], summary["n_border"], summary["n_measured"]) == (3, 1, 2)
    assert summary["voxel_size_nm_zyx"] == [VOXEL_NM] * 3
    ball = rows[0]
    assert float(ball["volume_nm3_voxels"]) == pytest.approx(int(ball["voxel_count"]) * VOXEL_NM**3, rel=1e-6)
    assert float(ball["centroid_z_nm"]) == pytest.approx(12 * VOXEL_NM)
    assert float(ball["axis_major_nm"]) == pytest.approx(12 * VOXEL_NM, rel=0.05)  # radius 6 voxels

    for r in rows:
        for fmt in MESH_FORMATS:
            path = folder / "meshes" / f"object_{int(r['id']):04d}.{fmt}"
            mesh = load_mesh(path)
            assert mesh.is_watertight, path.name
            assert mesh.volume == pytest.approx(float(r["volume_nm3_mesh"]), rel=1e-3), path.name
    for fmt in MESH_FORMATS:
        combined = load_mesh(folder / f"surfaces.{fmt}")
        assert combined.is_watertight
        assert combined.body_count == 3
    scene = trimesh.load(folder / "surfaces.glb")
    assert sorted(scene.geometry) == ["object_0001", "object_0002", "object_0003"]

    labels = open_volume(folder / "cellA_mask_objects.mrc")
    assert labels.voxel_size_nm == (VOXEL_NM,) * 3
    assert sorted(np.unique(labels.data).tolist()) == [0, 1, 2, 3]
    assert np.count_nonzero(labels.data == 2) == int(rows[1]["voxel_count"])
    assert float(rows[2]["xs_width_max_nm"]) == pytest.approx(9 * VOXEL_NM, abs=VOXEL_NM)  # rod diameter

    for png in ("montage.png", "surfaces_3d.png"):
        img = matplotlib.image.imread(folder / png)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05
    vol_rows = _read_csv(out / "summary.csv")
    assert vol_rows[0]["n_objects"] == "3" and vol_rows[0]["status"] == "ok"
    assert _no_partial_files(out)


# Cuboids (z, y, x) with the voxel counts 1, 810, 9800, 24332, 96819 and 429660, and where they lie.
CUBOIDS = {
    (1, 1, 1): (50, 120, 400),
    (9, 9, 10): (50, 80, 300),
    (14, 25, 28): (30, 80, 200),
    (14, 22, 79): (10, 80, 100),
    (3, 59, 547): (1, 80, 1),
    (60, 77, 93): (1, 1, 1),
}


def test_cuboids_measure_sanely_and_a_single_voxel_is_flagged(tmp_path):
    mask = np.zeros((64, 142, 552), np.uint8)
    for size, corner in CUBOIDS.items():
        mask[tuple(slice(c, c + n) for c, n in zip(corner, size, strict=True))] = 1
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    write_mrc(masks / "cuboids.mrc", mask)
    run(masks, out, min_voxels=1, formats=["ply"], pictures={"montage_slices": 0, "render_3d": False})
    rows = sorted(_read_csv(out / "cuboids" / "objects.csv"), key=lambda r: int(r["voxel_count"]))
    assert [int(r["voxel_count"]) for r in rows] == [1, 810, 9800, 24332, 96819, 429660]
    voxel = VOXEL_NM**3
    for r, size in zip(rows, CUBOIDS, strict=True):
        voxels = int(r["voxel_count"]) * voxel
        assert float(r["volume_nm3_voxels"]) == pytest.approx(voxels, rel=1e-6)
        if size == (1, 1, 1):  # too small for a surface: no mesh numbers, a flag, the raw mesh exported
            assert r["mesh_degenerate"] == "true", r
            assert float(r["volume_nm3_mesh_raw"]) == pytest.approx(voxels / 6)  # an octahedron
            assert r["volume_nm3_mesh"] == r["surface_area_nm2"] == r["surface_to_volume_um-1"] == ""
            mesh = load_mesh(out / "cuboids" / "meshes" / f"object_{int(r['id']):04d}.ply")
            assert mesh.is_watertight
            assert mesh.volume == pytest.approx(float(r["volume_nm3_mesh_raw"]), rel=1e-3)
            continue
        assert r["mesh_degenerate"] == "false", r
        # marching cubes cuts the edges and corners of the voxel box: a little less than the box
        assert 0.5 * voxels < float(r["volume_nm3_mesh_raw"]) < voxels
        assert 0.5 * voxels <= float(r["volume_nm3_mesh"]) <= 1.1 * voxels
        dz, dy, dx = (n * VOXEL_NM for n in size)
        box_area = 2 * (dz * dy + dy * dx + dz * dx)  # smoothing rounds the edges: a little less
        assert 0.7 * box_area < float(r["surface_area_nm2"]) < box_area
    (single,) = [
        o for o in json.loads((out / "cuboids" / "objects.json").read_text())["objects"] if o["voxel_count"] == 1
    ]
    assert single["volume_nm3_mesh"] is None and single["mesh_degenerate"] is True
    stats = json.loads((out / "cuboids" / "summary.json").read_text())["stats"]
    assert stats["volume_nm3_mesh"]["n"] == 5 and stats["volume_nm3_mesh"]["max"] <= 1.1 * 429660 * voxel


def test_empty_mask_gives_an_empty_table_and_no_meshes(tmp_path):
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    write_mrc(masks / "empty.mrc", np.zeros((6, 20, 24), np.uint8))
    (summary,) = run(masks, out)
    folder = out / "empty"
    assert summary["n_objects"] == 0
    assert _read_csv(folder / "objects.csv") == []
    assert (folder / "objects.csv").read_text().startswith("id,voxel_count,")
    assert json.loads((folder / "objects.json").read_text())["objects"] == []
    assert not list(folder.rglob("*.ply")) and not list(folder.rglob("*.glb"))
    assert (folder / "montage.png").exists() and not (folder / "surfaces_3d.png").exists()


@pytest.mark.filterwarnings("ignore:.*voxel size unknown")
def test_voxel_size_override_and_bad_inputs_are_reported_by_name(tmp_path, caplog):
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    tifffile.imwrite(masks / "nosize.tif", scene_mask())  # no calibration in the file
    with pytest.raises(RuntimeError, match="nosize.tif.*voxel_size_nm"):
        run(masks, out)
    run(masks, out, voxel_size_nm=[20, 9.8, 9.8], min_voxels=20, per_object_meshes=False, formats=["glb"])
    summary = json.loads((out / "nosize" / "summary.json").read_text())
    assert summary["voxel_size_nm_zyx"] == [20.0, 9.8, 9.8]
    assert sorted(p.name for p in (out / "nosize").glob("surfaces.*")) == ["surfaces.glb"]

    bad, out2 = tmp_path / "bad", tmp_path / "out2"
    bad.mkdir()
    rng = np.random.default_rng(2)
    write_mrc(bad / "tomogram.mrc", rng.normal(5.0, 3.0, (6, 16, 16)).astype(np.float32))
    soft = scene_mask().astype(np.float32) * 0.8 + 0.1  # probabilities 0.1 / 0.9
    write_mrc(bad / "soft.mrc", soft)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match="tomogram.mrc.*image, not a mask"),
    ):
        run(bad, out2, min_voxels=20, per_object_meshes=False)
    assert "soft.mrc" in caplog.text and "thresholding at 0.5" in caplog.text
    assert len(_read_csv(out2 / "soft" / "objects.csv")) == 3  # thresholded and processed
    status = {Path(r["file"]).name: r["status"] for r in _read_csv(out2 / "summary.csv")}
    assert status["soft.mrc"] == "ok" and status["tomogram.mrc"].startswith("failed:")
    assert _no_partial_files(out) and _no_partial_files(out2)


def _run_bundle_command(tmp_path, cwd, config_file, *options):
    """``monai.bundle run surfaces`` in a subprocess on the scene mask as ``tiny.mrc``; the output folder."""
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    write_mrc(masks / "tiny.mrc", scene_mask())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "surfaces", "--config_file", config_file]
    cmd += ["--dataset_dir", str(masks), "--output_dir", str(out), "--min_voxels", "20", *options]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_bundle_command_end_to_end(tmp_path):
    out = _run_bundle_command(tmp_path, REPO, "bundle/configs/surfaces.json", "--smoothing_iterations", "10")
    rows = _read_csv(out / "tiny" / "objects.csv")
    assert len(rows) == 3
    assert (out / "tiny" / "montage.png").stat().st_size > 10_000
    assert (out / "tiny" / "surfaces_3d.png").stat().st_size > 10_000
    assert (out / "summary.csv").exists()


def test_bundle_command_from_the_bundle_folder(tmp_path):
    options = ["--formats", "glb", "--per_object_meshes", "false", "--pictures#render_3d", "false"]
    out = _run_bundle_command(tmp_path, REPO / "bundle", "configs/surfaces.json", *options)
    assert len(_read_csv(out / "tiny" / "objects.csv")) == 3
    assert sorted(p.name for p in (out / "tiny").iterdir() if p.suffix in (".glb", ".ply", ".png")) == [
        "montage.png",
        "surfaces.glb",
    ]
