"""OME-Zarr in and out: round trips, levels, units, refused axes, bad stores, streaming, and OME-Zarr
through the real bundle runner and the simulator.

Stores for the reader are written with zarr itself (not our writer), the way other tools write them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numcodecs
import numpy as np
import pytest
import zarr
from scripts.io.readers import VolumeReader
from scripts.io.volume import (
    SliceWriter,
    VolumeError,
    bytes_to_write,
    find_volumes,
    open_volume,
    volume_stem,
    write_volume,
)
from scripts.train.dataset import list_training_data
from scripts.train.slices import LoadSliced

from conftest import REPO

CONFIG = REPO / "bundle" / "configs" / "inference.json"
VOX = (20.0, 9.8, 9.81)  # (z, y, x) nm, all different to catch axis swaps


def _axes(units: str | None = "micrometer", names: str = "zyx") -> list[dict]:
    kinds = {"t": "time", "c": "channel"}
    axes = [{"name": n, "type": kinds.get(n, "space")} for n in names]
    for axis in axes:
        if axis["type"] == "space" and units is not None:
            axis["unit"] = units
    return axes


def _ngff(
    path: Path,
    levels: list[np.ndarray],
    scales: list[list[float]],
    axes: list[dict],
    chunks: tuple[int, ...] | None = None,
    **image: object,
) -> Path:
    """An OME-NGFF 0.4 image written with zarr directly: one array per level at paths "0", "1"..."""
    group = zarr.open_group(zarr.storage.DirectoryStore(str(path)), mode="w")
    for i, data in enumerate(levels):
        group.create_dataset(str(i), data=data, chunks=chunks or data.shape, dimension_separator="/",
                             compressor=numcodecs.Blosc(cname="lz4"))  # fmt: skip
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                for i, s in enumerate(scales)]  # fmt: skip
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets, **image}]
    return path


def _chunk_files(store: Path) -> list[Path]:
    return [p for p in (store / "0").rglob("*") if p.is_file() and not p.name.startswith(".")]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def _infer(tomograms: Path, out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIG),
           "--dataset_dir", str(tomograms), "--output_dir", str(out), "--weights", str(weights),
           "--width", "4", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float16", "float32"])
def test_write_then_open_keeps_shape_dtype_values_and_voxel_size(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(5, 33, 41)) * 100).astype(dtype) if dtype.startswith("f") else \
        rng.integers(0, np.iinfo(dtype).max, size=(5, 33, 41)).astype(dtype)  # fmt: skip
    path = write_volume(tmp_path / "cell.ome.zarr", data, VOX)
    volume = open_volume(path)
    assert volume.shape == (5, 33, 41) and volume.dtype == np.dtype(dtype)
    assert volume.voxel_size_nm == VOX
    np.testing.assert_array_equal(np.asarray(volume.data), data)
    np.testing.assert_array_equal(volume.data[3], data[3])
    # what other tools see: level "0", chunks of one slice, the scale in nanometer on z, y, x
    group = zarr.open_group(str(path), mode="r")
    assert group["0"].chunks == (1, 33, 41)
    image = group.attrs["multiscales"][0]
    assert [a["name"] for a in image["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in image["axes"]} == {"nanometer"}
    assert image["datasets"][0]["coordinateTransformations"][0]["scale"] == list(VOX)
    # MONAI's LoadImage through the bundle's reader, as the training transforms use it
    array, meta = VolumeReader().get_data(VolumeReader().read(path))
    np.testing.assert_array_equal(array, data)
    assert tuple(meta["spacing"]) == VOX


def test_large_slices_are_chunked_and_the_origin_round_trips(tmp_path):
    data = np.zeros((2, 1100, 1030), np.uint8)
    data[1, 1050:, 1000:] = 7
    source = write_volume(tmp_path / "a.mrc", data, VOX)
    with mrcfile.open(source, mode="r+") as mrc:
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = 100.0, 200.0, 300.0
    path = write_volume(tmp_path / "a.ome.zarr", open_volume(source))
    assert zarr.open_array(str(path / "0"), mode="r").chunks == (1, 1024, 1024)
    volume = open_volume(path)
    assert volume.origin_angstrom == (100.0, 200.0, 300.0)
    np.testing.assert_array_equal(volume.data[1], data[1])


def test_unknown_voxel_size_stays_unknown(tmp_path):
    path = write_volume(tmp_path / "a.ome.zarr", np.ones((3, 8, 8), np.uint8))
    with pytest.warns(UserWarning, match=r"a\.ome\.zarr: voxel size unknown"):
        assert open_volume(path).voxel_size_nm is None


# ----------------------------------------------------------------------------- levels, units, axes


def test_highest_resolution_by_default_and_a_level_option(tmp_path):
    full = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    half = full[::2, ::2, ::2].copy()
    path = _ngff(tmp_path / "two.ome.zarr", [full, half], [[0.02, 0.01, 0.01], [0.04, 0.02, 0.02]], _axes())
    assert open_volume(path).shape == (4, 16, 16)
    assert open_volume(path).voxel_size_nm == (20.0, 10.0, 10.0)  # micrometer -> nm
    level1 = open_volume(path, level=1)
    assert level1.shape == (2, 8, 8) and level1.voxel_size_nm == (40.0, 20.0, 20.0)
    np.testing.assert_array_equal(np.asarray(level1.data), half)
    with pytest.raises(VolumeError, match=r"two\.ome\.zarr: level 2 does not exist; .* levels 0 to 1"):
        open_volume(path, level=2)


@pytest.mark.parametrize(
    ("unit", "scale", "expected"),
    [("nanometer", 9.8, 9.8), ("micrometer", 0.0098, 9.8), ("angstrom", 98.0, 9.8)],
)
def test_units_are_converted_to_nm(tmp_path, unit, scale, expected):
    path = _ngff(tmp_path / "u.zarr", [np.zeros((3, 8, 8), np.uint8)], [[scale] * 3], _axes(unit))
    assert open_volume(path).voxel_size_nm == pytest.approx((expected,) * 3)


def test_image_wide_scale_is_applied_after_the_levels(tmp_path):
    path = _ngff(tmp_path / "g.zarr", [np.zeros((3, 8, 8), np.uint8)], [[1.0, 1.0, 1.0]], _axes("nanometer"),
                 coordinateTransformations=[{"type": "scale", "scale": [20.0, 10.0, 10.0]}])  # fmt: skip
    assert open_volume(path).voxel_size_nm == (20.0, 10.0, 10.0)


@pytest.mark.parametrize("units", ["pixel", None])
def test_unknown_unit_gives_no_voxel_size_and_a_warning(tmp_path, units):
    path = _ngff(tmp_path / "p.zarr", [np.zeros((3, 8, 8), np.uint8)], [[1.0] * 3], _axes(units))
    with pytest.warns(UserWarning, match=r"p\.zarr: voxel size unknown"):
        assert open_volume(path).voxel_size_nm is None
    assert open_volume(path, voxel_size_nm=9.8).voxel_size_nm == (9.8, 9.8, 9.8)


def test_time_and_channel_axes_of_size_one_are_dropped(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(1, 1, 3, 8, 8)
    path = _ngff(tmp_path / "tc.ome.zarr", [data], [[1.0, 1.0, 0.02, 0.01, 0.01]], _axes(names="tczyx"))
    volume = open_volume(path)
    assert volume.shape == (3, 8, 8) and volume.voxel_size_nm == (20.0, 10.0, 10.0)
    np.testing.assert_array_equal(volume.data[2], data[0, 0, 2])


@pytest.mark.parametrize(
    ("names", "shape", "extra"), [("czyx", (2, 3, 8, 8), "c=2"), ("tczyx", (3, 1, 3, 8, 8), "t=3")]
)
def test_several_channels_or_time_points_are_refused(tmp_path, names, shape, extra):
    path = _ngff(tmp_path / "multi.ome.zarr", [np.zeros(shape, np.uint8)], [[1.0] * len(shape)],
                 _axes(names=names))  # fmt: skip
    with pytest.raises(VolumeError, match=rf"multi\.ome\.zarr: .* has {extra}; expected one 3D stack"):
        open_volume(path)


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunks", [(1, 300, 280), (8, 256, 256)])
def test_a_slice_reads_only_the_chunks_it_touches(tmp_path, chunks):
    data = np.random.default_rng(0).integers(0, 255, size=(20, 300, 280)).astype(np.uint8)
    path = _ngff(tmp_path / "s.ome.zarr", [data], [[1.0] * 3], _axes(), chunks=chunks)
    z = 3
    keep = {f"{z // chunks[0]}/{y}/{x}" for y in range(2) for x in range(2)}
    broken = 0
    for chunk in _chunk_files(path):  # every other chunk no longer decodes
        if chunk.relative_to(path / "0").as_posix() not in keep:
            chunk.write_bytes(b"not a chunk")
            broken += 1
    assert broken > 0
    volume = open_volume(path)  # opening reads metadata only
    np.testing.assert_array_equal(volume.data[z], data[z])
    np.testing.assert_array_equal(volume.data[z : z + 1, 10:20], data[z : z + 1, 10:20])
    with pytest.raises(VolumeError, match=r"s\.ome\.zarr: cannot read .*truncated or corrupt"):
        volume.data[19]


def test_a_truncated_chunk_of_incompressible_data_is_refused(tmp_path):
    # Blosc keeps incompressible bytes as a plain copy, which numcodecs decoded from past the end of
    # a truncated chunk without an error (random uint8 read back as other numbers).
    data = np.random.default_rng(0).integers(0, 255, size=(4, 64, 64)).astype(np.uint8)
    path = write_volume(tmp_path / "r.ome.zarr", data, VOX)
    chunk = path / "0" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    volume = open_volume(path)
    np.testing.assert_array_equal(volume.data[1], data[1])  # the intact chunks still read
    with pytest.raises(VolumeError, match=r"r\.ome\.zarr: cannot read slice z=2 .*Blosc header says"):
        volume.data[2]


# ----------------------------------------------------------------------------- bad stores


def _bad_store(kind: str, tmp: Path) -> Path:
    path = tmp / "bad.ome.zarr"
    if kind == "missing folder":
        return path
    if kind == "a file":
        path.write_bytes(b"zarr?")
        return path
    if kind == "empty folder":
        path.mkdir()
        return path
    if kind == "bare array":
        zarr.open_array(str(path), mode="w", shape=(3, 8, 8), dtype="u1")
        return path
    if kind == "zarr v3":
        path.mkdir()
        (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
        return path
    _ngff(path, [np.zeros((3, 8, 8), np.uint8)], [[1.0] * 3], _axes())
    if kind == "missing .zattrs":
        (path / ".zattrs").unlink()
    elif kind == "not OME metadata":
        (path / ".zattrs").write_text(json.dumps({"description": "some other group"}))
    elif kind == "broken .zattrs":
        (path / ".zattrs").write_text("{not json")
    elif kind == "missing .zarray":
        (path / "0" / ".zarray").unlink()
    elif kind == "2D axes count wrong":
        attrs = json.loads((path / ".zattrs").read_text())
        attrs["multiscales"][0]["axes"] = attrs["multiscales"][0]["axes"][:2]
        (path / ".zattrs").write_text(json.dumps(attrs))
    elif kind == "path outside the store":
        attrs = json.loads((path / ".zattrs").read_text())
        attrs["multiscales"][0]["datasets"][0]["path"] = "../../etc"
        (path / ".zattrs").write_text(json.dumps(attrs))
    else:
        raise AssertionError(kind)
    return path


BAD = {
    "missing folder": "folder does not exist",
    "a file": "is a file; an OME-Zarr store is a folder",
    "empty folder": "not a Zarr store",
    "bare array": "a bare Zarr array without OME-NGFF metadata",
    "zarr v3": "Zarr v3 store (OME-NGFF 0.5)",
    "missing .zattrs": "not an OME-Zarr image (no .zattrs)",
    "not OME metadata": "not an OME-Zarr image (no 'multiscales'",
    "broken .zattrs": "cannot read its Zarr metadata",
    "missing .zarray": "level 0 (folder '0') has no .zarray",
    "2D axes count wrong": "2 OME-Zarr 'axes' for an array of 3 dimensions",
    "path outside the store": "level 0 has no usable 'path' ('../../etc')",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_stores_raise_one_volume_error_naming_the_store(tmp_path, kind):
    path = _bad_store(kind, tmp_path)
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and BAD[kind] in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("kind", "expected"), [("truncated chunk", "truncated or corrupt"), ("not OME metadata", "not an OME-Zarr image")]
)
def test_a_bad_store_ends_the_bundle_run_on_one_line(tmp_path, weights, kind, expected):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    if kind == "truncated chunk":
        path = write_volume(tomograms / "bad.ome.zarr", np.ones((4, 32, 32), np.float32), VOX)
        chunk = path / "0" / "2" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:20])
    else:
        path = _bad_store(kind, tomograms)
    out = tmp_path / "out"
    result = _infer(tomograms, out, weights, "--formats", "[ome.zarr]")
    assert result.returncode == 1, result.stderr[-3000:]
    last = _last_line(result.stderr)
    assert last.startswith("ERROR: ") and str(path) in last and expected in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _partials(out) == [] and not (out / "bad_mask.ome.zarr").exists()


# ----------------------------------------------------------------------------- writing


def test_a_failed_write_leaves_nothing_and_a_rewrite_replaces_the_store(tmp_path):
    path = tmp_path / "m.ome.zarr"
    with pytest.raises(RuntimeError), SliceWriter(path, (4, 8, 8), np.uint8, VOX) as writer:
        writer.write(0, np.ones((2, 8, 8), np.uint8))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_volume(path, np.ones((4, 8, 8), np.uint8), VOX)
    write_volume(path, np.full((2, 8, 8), 2, np.uint8), VOX)  # over an existing store
    assert open_volume(path).shape == (2, 8, 8) and int(open_volume(path).data[1].max()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.ome.zarr"]


def test_the_free_space_estimate_bounds_an_incompressible_store(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, size=(6, 70, 90)).astype(np.uint8)
    path = write_volume(tmp_path / "r.ome.zarr", data)
    used = sum(os.stat(p).st_blocks * 512 for p in path.rglob("*"))
    assert data.nbytes <= used <= bytes_to_write(path, data.shape, data.dtype)


def test_folders_list_stores_and_training_data_accepts_them(tmp_path):
    image = np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32)
    label = np.zeros((4, 16, 16), np.uint8)
    label[1, 4:8, 4:8] = 1
    label[2] = 255
    write_volume(tmp_path / "images" / "cell.ome.zarr", image, VOX)
    write_volume(tmp_path / "labels" / "cell.ome.zarr", label, VOX)
    write_volume(tmp_path / "unlabeled" / "other.zarr", image, VOX)
    (tmp_path / "unlabeled" / ".other.partial-1234.ome.zarr").mkdir()  # a killed run's leftover
    (tmp_path / "unlabeled" / "notes.zarr").write_text("a file, not a store")
    assert [p.name for p in find_volumes(tmp_path / "unlabeled")] == ["other.zarr"]
    assert volume_stem(tmp_path / "images" / "cell.ome.zarr") == "cell"
    labeled, unlabeled = list_training_data(tmp_path)
    assert [(v.image.name, v.label.name, v.annotated_slices) for v in labeled] == [
        ("cell.ome.zarr", "cell.ome.zarr", [0, 1, 3])
    ]
    assert [p.name for p in unlabeled] == ["other.zarr"]
    item = LoadSliced(keys=("image", "label"), label_keys=("label",))(
        {"image": str(labeled[0].image), "label": str(labeled[0].label), "z": 1}
    )
    np.testing.assert_allclose(item["image"][0].numpy(), image[1])
    assert item["label"].shape == (1, 16, 16) and float(item["label"].max()) == 1.0


# ----------------------------------------------------------------------------- runners


def test_inference_reads_and_writes_ome_zarr_and_a_rerun_skips_it(tmp_path, weights):
    tomograms = tmp_path / "tomograms"
    rng = np.random.default_rng(0)
    full = rng.normal(size=(6, 48, 40)).astype(np.float32)
    _ngff(tomograms / "cell.ome.zarr", [full, full[::2, ::2, ::2].copy()],
          [[0.02, 0.0098, 0.0098], [0.04, 0.0196, 0.0196]], _axes(), chunks=(2, 32, 32))  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".cell_mask.partial-dead1234.ome.zarr"  # left by a killed run
    (stale / "0").mkdir(parents=True)
    result = _infer(tomograms, out, weights, "--formats", "[ome.zarr, mrc]", "--probability", "uint8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "cell_summary.json").read_text())
    assert summary["shape"] == [6, 48, 40] and summary["voxel_size_nm"] == [20.0, 9.8, 9.8]
    assert summary["outputs"]["mask"] == ["cell_mask.ome.zarr", "cell_mask.mrc"]
    mask = open_volume(out / "cell_mask.ome.zarr")
    assert mask.shape == (6, 48, 40) and mask.dtype == np.uint8 and mask.voxel_size_nm == (20.0, 9.8, 9.8)
    with mrcfile.open(out / "cell_mask.mrc") as mrc:
        np.testing.assert_array_equal(np.asarray(mask.data), mrc.data.view(np.uint8))
    assert set(np.unique(np.asarray(mask.data))) <= {0, 1}
    prob = open_volume(out / "cell_prob.ome.zarr")
    assert prob.dtype == np.uint8 and prob.shape == (6, 48, 40)
    assert _partials(out) == []

    written = [out / "cell_summary.json", out / "cell_mask.ome.zarr" / ".zattrs", out / "cell_mask.ome.zarr"]
    stamps = [p.stat().st_mtime_ns for p in written]
    again = _infer(tomograms, out, weights, "--formats", "[ome.zarr, mrc]", "--probability", "uint8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in written] == stamps  # complete: skipped, not written again

    low = tmp_path / "low"
    result = _infer(tomograms, low, weights, "--formats", "[ome.zarr]", "--zarr_level", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((low / "cell_summary.json").read_text())
    assert summary["shape"] == [3, 24, 20] and summary["voxel_size_nm"] == [40.0, 19.6, 19.6]


def test_simulator_writes_ome_zarr(tmp_path):
    import fire

    from cryosxt_sim.simulate import main

    argv = ["--out", str(tmp_path), "--count", "1", "--shape", "8,32,32", "--seed", "2",
            "--instrument", "bessy", "--tilt_step_deg", "10", "--formats", "ome.zarr,mrc"]  # fmt: skip
    fire.Fire(main, command=argv)
    name = "sim_bessy_s2_000"
    for folder in ("images", "labels", "instances"):
        store = open_volume(tmp_path / folder / f"{name}.ome.zarr", check_finite=False)
        reference = open_volume(tmp_path / folder / f"{name}.mrc", check_finite=False)
        assert store.shape == (8, 32, 32) and store.voxel_size_nm == pytest.approx((9.8,) * 3)
        np.testing.assert_array_equal(np.asarray(store.data), np.asarray(reference.data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the simulator's stores carry their units
        open_volume(tmp_path / "images" / f"{name}.ome.zarr")
