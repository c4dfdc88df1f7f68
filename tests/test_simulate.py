"""Tests of the cryo-SXT simulator: reproducibility, exact ground truth, missing wedge, CLI layout."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO
from cryosxt_sim.phantom import GT_HALF_VOXELS, build_phantom
from cryosxt_sim.simulate import INSTRUMENTS, main, simulate_tomogram
from cryosxt_sim.tomography import get_projector, reconstruct, tilt_angles

# Fewer angles and iterations than the presets: same physics, a fraction of the time.
FAST = dataclasses.replace(INSTRUMENTS["bessy"], tilt_step_deg=3.0, iterations=10)


@pytest.fixture(scope="module")
def tomo():
    return simulate_tomogram((32, 128, 128), FAST, seed=0)


@pytest.fixture(scope="module")
def phantoms():
    """Phantoms (no tomography) at 9.8 nm and 35 nm voxels with every organelle kind present."""
    out = {}
    for voxel in (9.8, 35.0):
        shape = (40, 160, 160)
        found = []
        for seed in range(8):
            # no lateral padding: the ground truth lives in the field of view only
            ph = build_phantom(shape, voxel, (2, 2), np.random.default_rng(seed))
            found.append(ph)
            kinds = {o["kind"] for p in found for o in p.objects}
            if {"vesicle", "mitochondrion", "droplet"} <= kinds and len(found) >= 2:
                break
        out[voxel] = found
    return out


def _surface_points(obj: dict, n: int = 400) -> np.ndarray:
    """Points (nm, z-y-x) on the analytic surface of a vesicle, droplet or mitochondrion."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.asarray(obj["center_nm"])
    if "radius_nm" in obj:
        return c + obj["radius_nm"] * u
    axes = np.asarray(obj["axes"])  # rows: unit axes in (z, y, x)
    return c + (u * np.asarray(obj["semi_axes_nm"])) @ axes


def _lookup(mask: np.ndarray, pts_nm: np.ndarray, voxel: float) -> np.ndarray:
    idx = np.round(pts_nm / voxel).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
    return mask[tuple(idx[ok].T)]


def test_same_seed_same_volumes_other_seed_differs():
    shape, inst = (12, 48, 48), dataclasses.replace(FAST, tilt_step_deg=5.0)
    a = simulate_tomogram(shape, inst, seed=3)
    b = simulate_tomogram(shape, inst, seed=3)
    c = simulate_tomogram(shape, inst, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.membrane, b.membrane)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert a.objects == b.objects
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.membrane, c.membrane)


def test_outputs_types_and_instance_table(tomo):
    assert tomo.image.dtype == np.float32 and tomo.image.shape == (32, 128, 128)
    assert np.isfinite(tomo.image).all()
    assert tomo.membrane.dtype == np.uint8 and set(np.unique(tomo.membrane)) <= {0, 1}
    assert 0.005 < tomo.membrane.mean() < 0.3
    ids = set(np.unique(tomo.instances)) - {0}
    assert ids == {o["id"] for o in tomo.objects}
    counts = np.bincount(tomo.instances.ravel())
    assert all(counts[o["id"]] == o["voxels"] for o in tomo.objects)
    json.dumps(tomo.objects)  # plain Python values only
    assert tomo.voxel_size_nm == FAST.voxel_size_nm


def test_mask_lies_on_membranes_and_not_in_droplets(phantoms):
    checked = {"vesicle": 0, "mitochondrion": 0, "droplet": 0}
    for voxel, found in phantoms.items():
        for ph in found:
            for o in ph.objects:
                if o["kind"] in ("vesicle", "mitochondrion"):
                    hits = _lookup(ph.membrane, _surface_points(o), voxel)
                    assert hits.size and hits.mean() > 0.95, (voxel, o)
                    checked[o["kind"]] += 1
                elif o["kind"] == "droplet" and o["radius_nm"] > 4 * voxel:
                    core = np.asarray(o["center_nm"]) + (o["radius_nm"] - 2.5 * voxel) * (
                        _surface_points({"center_nm": [0, 0, 0], "radius_nm": 1.0})
                    )
                    assert _lookup(ph.membrane, core, voxel).sum() == 0
                    inside = ph.instances == o["id"]
                    inner = ndimage.binary_erosion(inside, iterations=2)
                    assert ph.membrane[inner].sum() == 0
                    checked["droplet"] += 1
                if o["kind"] == "vesicle" and not o["clipped"]:  # analytic volume = voxel count
                    expected = 4 / 3 * math.pi * o["radius_nm"] ** 3 / voxel**3
                    assert abs(o["voxels"] - expected) < 0.15 * expected + 10
    assert min(checked.values()) > 0, checked


@pytest.mark.parametrize("voxel", [9.8, 35.0])
def test_membrane_thickness_is_two_to_three_voxels(phantoms, voxel):
    runs = []
    for ph in phantoms[voxel]:
        for o in ph.objects:
            if o["kind"] != "vesicle" or o["radius_nm"] < 3 * voxel:
                continue
            c = np.asarray(o["center_nm"])
            dirs = _surface_points({"center_nm": [0, 0, 0], "radius_nm": 1.0}, 60)
            t = np.arange(-4, 4, 0.05) * voxel + o["radius_nm"]
            for d in dirs:
                pts = c + t[:, None] * d
                idx = np.round(pts / voxel).astype(int)
                if np.any(idx < 0) or np.any(idx >= np.array(ph.membrane.shape)):
                    continue
                hit = ph.membrane[tuple(idx.T)] > 0
                if hit.any():
                    runs.append(hit.sum() * 0.05)  # length of the crossing, in voxels
    assert len(runs) > 20
    med = float(np.median(runs))
    assert 2.0 <= med <= 3.2, med
    # and as a whole: two 6-connected erosions remove (almost) all of a 2-3 voxel sheet
    frac = [
        ndimage.binary_erosion(ph.membrane, iterations=2).sum() / max(ph.membrane.sum(), 1) for ph in phantoms[voxel]
    ]
    assert max(frac) < 0.08, frac
    assert GT_HALF_VOXELS * 2 == pytest.approx(2.5)


def _wedge_power(image: np.ndarray, tilt_max: float, margin: float = 8.0) -> tuple[float, float]:
    """Mean XZ power inside the missing wedge (frequencies within 90 - tilt_max of kz) and outside."""
    planes = image - image.mean(axis=(0, 2), keepdims=True)
    # Hann taper: the volume's faces would otherwise smear measured power into the wedge
    taper = np.hanning(image.shape[0])[:, None, None] * np.hanning(image.shape[2])[None, None, :]
    power = (np.abs(np.fft.fft2(planes * taper, axes=(0, 2))) ** 2).mean(axis=1)
    kz = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.fftfreq(image.shape[2])[None, :]
    k = np.hypot(kz, kx)
    # A projection at tilt t samples the central slice normal to the beam (sin t, cos t) in (x, z):
    # directions at angle t from the kx axis. |t| <= tilt_max: measured; beyond: the missing wedge.
    ang = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    band = (k > 0.08) & (k < 0.45)
    wedge = band & (ang > tilt_max + margin)
    seen = band & (ang < tilt_max - margin)
    return float(power[wedge].mean()), float(power[seen].mean())


def test_missing_wedge_in_xz_power_spectrum(tomo):
    inside, outside = _wedge_power(tomo.image, FAST.tilt_max_deg)
    assert inside < 0.02 * outside, (inside, outside)


def test_full_range_reconstruction_fills_the_wedge():
    """Control for the wedge test: the same measure on a +/-90 degree reconstruction is far higher."""
    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.normal(size=(32, 4, 64)), 1.0).astype(np.float32)
    ratio = {}
    for tmax in (90.0, 60.0):
        ang = tilt_angles(tmax, 2.0)[: -1 if tmax == 90 else None]
        sino = get_projector(32, 64, 64, tuple(ang), False).forward(vol)
        rec = reconstruct(sino, 32, 10.0, ang, 30, extend=0)
        inside, outside = _wedge_power(rec, 60.0)
        ratio[tmax] = inside / outside
    assert ratio[90.0] > 0.2 and ratio[60.0] < 0.1 * ratio[90.0], ratio


def test_instruments_differ_in_voxel_size_and_polarity():
    fast = {k: dataclasses.replace(v, tilt_step_deg=5.0, iterations=8) for k, v in INSTRUMENTS.items()}
    assert len({i.voxel_size_nm for i in INSTRUMENTS.values()}) == len(INSTRUMENTS)
    signs = {}
    for name in ("bessy", "mistral"):
        t = simulate_tomogram((16, 64, 64), fast[name], seed=5)
        cell, ice = t.instances > 0, t.instances == 0
        assert cell.any() and ice.any()
        signs[name] = np.sign(t.image[cell].mean() - t.image[ice].mean())
        assert t.voxel_size_nm == INSTRUMENTS[name].voxel_size_nm
    assert signs == {"bessy": 1.0, "mistral": -1.0}


def test_cli_writes_training_layout(tmp_path):
    out = tmp_path / "sim"
    names = main(
        out=str(out),
        count=1,
        shape="12,40,40",
        seed=1,
        instrument="bessy",
        unlabeled=1,
        unlabeled_instrument="mistral",
        formats="mrc,tif",
        tilt_step_deg=5.0,
    )
    assert len(names) == 2
    lab, unl = names
    for sub in ("images", "labels", "instances"):
        assert (out / sub / f"{lab}.mrc").is_file() and (out / sub / f"{lab}.tif").is_file()
    assert (out / "unlabeled" / f"{unl}.mrc").is_file()
    assert not (out / "labels" / f"{unl}.mrc").exists()
    with mrcfile.open(out / "images" / f"{lab}.mrc", permissive=True) as m:
        assert m.data.shape == (12, 40, 40)
        assert float(m.voxel_size.x) == pytest.approx(98.0, abs=0.01)  # Angstrom
    with mrcfile.open(out / "labels" / f"{lab}.mrc", permissive=True) as m:
        assert m.data.dtype.itemsize == 1 and set(np.unique(m.data)) <= {0, 1}  # MRC mode 0
    with mrcfile.open(out / "unlabeled" / f"{unl}.mrc", permissive=True) as m:
        assert float(m.voxel_size.x) == pytest.approx(130.0, abs=0.01)
    meta = json.loads((out / "instances" / f"{lab}.json").read_text())
    with mrcfile.open(out / "instances" / f"{lab}.mrc", permissive=True) as m:
        assert set(np.unique(m.data)) - {0} == {o["id"] for o in meta["objects"]}
    assert meta["voxel_size_nm"] == pytest.approx(9.8)


def test_cli_entry_point(tmp_path):
    """The command line as users type it (parsed by fire, in-process to skip a second torch import)."""
    import fire

    argv = [
        "--out",
        str(tmp_path),
        "--count",
        "1",
        "--shape",
        "12,40,40",
        "--seed",
        "2",
        "--instrument",
        "b24",
        "--tilt_step_deg",
        "6",
    ]
    fire.Fire(main, command=argv)
    files = sorted(p.name for p in (tmp_path / "labels").iterdir())
    assert files == ["sim_b24_s2_000.mrc"]
    with mrcfile.open(tmp_path / "images" / files[0], permissive=True) as m:
        assert m.data.shape == (12, 40, 40)
        assert float(m.voxel_size.z) == pytest.approx(200.0, abs=0.01)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--output_dir", "X"], "unknown option --output_dir; valid options: --out, --count,"),
        ([], "missing option --out; valid options: --out, --count,"),
        (["--out", "X", "--count", "two"], "--count must be a whole number >= 0, got 'two'"),
        (["--out", "X", "--seed", "-1"], "--seed must be a whole number >= 0, got -1"),
        (["--out", "X", "--cell", "plant"], "unknown cell kind 'plant'; choose from"),
        (["--out", "X", "--instrument", "synchrotron"], "unknown instrument 'synchrotron'; choose from"),
    ],
    ids=["unknown flag", "no --out", "bad count", "bad seed", "bad cell", "bad instrument"],
)
def test_cli_refuses_bad_flags_before_any_work_and_writes_nothing(tmp_path, flags, expected):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    bundle = REPO / "bundle"
    before = sorted(p.name for p in bundle.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "cryosxt_sim", *flags, "--shape", "8,16,16", "--tilt_step_deg", "10"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: {expected}"), result.stderr[-2000:]
    assert list(cwd.iterdir()) == []  # nothing simulated into a default folder
    assert sorted(p.name for p in bundle.iterdir()) == before
