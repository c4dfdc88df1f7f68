"""Measurements against exact geometry: voxelised sphere, ellipsoid and rod (capsule) in nm.

The printed lines (``pytest -s``) are the accuracy figures quoted in docs/surfaces.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import ellipeinc, ellipkinc
from scripts.surfaces.measure import caliper_width, cross_sections, measure_object, moments, summarize
from scripts.surfaces.meshes import mask_surface, object_surface
from scripts.surfaces.morphology import ObjectInfo, find_objects, object_crop
from skimage.measure import regionprops

ISO = (9.8, 9.8, 9.8)
ANISO = (20.0, 9.8, 9.8)


def _grid(shape, spacing, centre_nm):
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_nm, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def ellipsoid_mask(semi_axes_zyx, spacing, pad=3, shift=(0.3, 0.1, 0.2)):
    """Voxels whose centres lie in the ellipsoid (centre off the grid by ``shift`` voxels); and the
    centre in nm (z, y, x)."""
    shape = [int(math.ceil(2 * a / s)) + 2 * pad for a, s in zip(semi_axes_zyx, spacing, strict=True)]
    centre = [((n - 1) / 2 + f) * s for n, s, f in zip(shape, spacing, shift, strict=True)]
    z, y, x = _grid(shape, spacing, centre)
    a, b, c = semi_axes_zyx
    return (z / a) ** 2 + (y / b) ** 2 + (x / c) ** 2 <= 1.0, centre


def capsule_mask(diameter, length, spacing, pad=3, shift=(0.3, 0.1, 0.2)):
    """A rod along x: cylinder with hemispherical caps, total length ``length`` (caps included)."""
    r, h = diameter / 2, (length - diameter) / 2
    shape = [
        int(math.ceil(diameter / spacing[0])) + 2 * pad,
        int(math.ceil(diameter / spacing[1])) + 2 * pad,
        int(math.ceil(length / spacing[2])) + 2 * pad,
    ]
    centre = [((n - 1) / 2 + f) * s for n, s, f in zip(shape, spacing, shift, strict=True)]
    z, y, x = _grid(shape, spacing, centre)
    xc = np.clip(x, -h, h)
    return z**2 + y**2 + (x - xc) ** 2 <= r * r, centre


def ellipsoid_area(a, b, c):
    """Exact surface area of an ellipsoid (Legendre's formula with incomplete elliptic integrals)."""
    a, b, c = sorted((a, b, c), reverse=True)
    if math.isclose(a, c):
        return 4 * math.pi * a * a
    phi = math.acos(c / a)
    m = (a * a * (b * b - c * c)) / (b * b * (a * a - c * c))
    s = math.sin(phi)
    return 2 * math.pi * c * c + 2 * math.pi * a * b / s * (
        ellipeinc(phi, m) * s * s + ellipkinc(phi, m) * math.cos(phi) ** 2
    )


def capsule_exact(d, length):
    """Volume, area and equivalent-ellipsoid axes (sqrt(20 * variance)) of a capsule along x."""
    r, h = d / 2, (length - d) / 2
    v = math.pi * r * r * 2 * h + 4 / 3 * math.pi * r**3
    area = 2 * math.pi * r * 2 * h + 4 * math.pi * r * r
    ixx = math.pi * r * r * 2 * h**3 / 3 + 2 * quad(lambda u: (h + u) ** 2 * math.pi * (r * r - u * u), 0, r)[0]
    iyy = 2 * h * math.pi * r**4 / 4 + 4 * math.pi * r**5 / 15
    return v, area, math.sqrt(20 * ixx / v), math.sqrt(20 * iyy / v)


def stadium(w, h):
    """Ellipse axes (4 sqrt(variance)) and perimeter of a stadium: rectangle 2h x 2w, caps radius w."""
    area = 4 * h * w + math.pi * w * w
    vy = (4 * h * w**3 / 3 + math.pi * w**4 / 4) / area
    vx = (4 * w * h**3 / 3 + math.pi * w * w * h * h + 8 * h * w**3 / 3 + math.pi * w**4 / 4) / area
    return 4 * math.sqrt(vx), 4 * math.sqrt(vy), 4 * h + 2 * math.pi * w


def _measure(mask, spacing, smoothing=25):
    framed = np.pad(mask, 1)
    obj = ObjectInfo(1, tuple(slice(0, n) for n in mask.shape), int(mask.sum()), False)
    mesh, raw = object_surface(framed, spacing, (-1, -1, -1), smoothing)
    return measure_object(obj, framed, (-1, -1, -1), spacing, mesh, raw), mesh


def _err(a, b):
    return (a - b) / abs(b)


def _rel(a, b):
    return abs(_err(a, b))


@pytest.mark.parametrize("spacing", [ISO, ANISO], ids=["iso9.8", "aniso20x9.8x9.8"])
def test_sphere(spacing):
    radius = 200.0
    row, mesh = _measure(ellipsoid_mask((radius,) * 3, spacing)[0], spacing)
    v, a = 4 / 3 * math.pi * radius**3, 4 * math.pi * radius**2
    print(
        f"\nsphere r=200 nm @ {spacing}: V_vox {_err(row['volume_nm3_voxels'], v):+.2%} "
        f"V_mesh {_err(row['volume_nm3_mesh'], v):+.2%} A {_err(row['surface_area_nm2'], a):+.2%} "
        f"(raw marching cubes {_err(row['surface_area_nm2_raw'], a):+.2%}) "
        f"axes {[round(x, 1) for x in (row['axis_major_nm'], row['axis_middle_nm'], row['axis_minor_nm'])]}"
    )
    assert mesh.is_watertight and mesh.volume > 0
    assert _rel(row["volume_nm3_voxels"], v) < 0.03
    assert _rel(row["volume_nm3_mesh"], v) < 0.03
    assert _rel(row["surface_area_nm2"], a) < 0.05
    assert _rel(row["surface_area_nm2_raw"], a) > 0.05  # the staircase the smoothing removes
    for key in ("axis_major_nm", "axis_middle_nm", "axis_minor_nm"):
        assert _rel(row[key], 2 * radius) < 0.05
    assert row["surface_to_volume_um-1"] == pytest.approx(1000 * row["surface_area_nm2"] / row["volume_nm3_mesh"])


def test_ellipsoid_anisotropic():
    semi = (150.0, 250.0, 400.0)  # z, y, x
    spacing = (15.0, 9.8, 9.8)
    mask, centre = ellipsoid_mask(semi, spacing)
    row, mesh = _measure(mask, spacing)
    v, a = 4 / 3 * math.pi * np.prod(semi), ellipsoid_area(*semi)
    axes = (row["axis_major_nm"], row["axis_middle_nm"], row["axis_minor_nm"])
    print(
        f"\nellipsoid 300x500x800 nm @ {spacing}: V {_err(row['volume_nm3_mesh'], v):+.2%} "
        f"A {_err(row['surface_area_nm2'], a):+.2%} (raw {_err(row['surface_area_nm2_raw'], a):+.2%}) "
        f"axes {[round(x, 1) for x in axes]} vs [800, 500, 300]"
    )
    assert mesh.is_watertight
    assert _rel(row["volume_nm3_mesh"], v) < 0.03
    assert _rel(row["surface_area_nm2"], a) < 0.05
    for got, want in zip(axes, (800.0, 500.0, 300.0), strict=True):
        assert _rel(got, want) < 0.05
    got = (row["centroid_z_nm"], row["centroid_y_nm"], row["centroid_x_nm"])
    assert got == pytest.approx(centre, abs=0.1 * min(spacing))


@pytest.mark.parametrize("spacing", [ISO, (15.0, 9.8, 9.8)], ids=["iso9.8", "aniso15x9.8x9.8"])
def test_rod_like_a_filopodium(spacing):
    d, length = 150.0, 1000.0
    mask, centre = capsule_mask(d, length, spacing)
    row, mesh = _measure(mask, spacing)
    v, a, major, minor = capsule_exact(d, length)
    print(
        f"\nrod d=150 L=1000 nm @ {spacing}: V_vox {_err(row['volume_nm3_voxels'], v):+.2%} "
        f"V_mesh {_err(row['volume_nm3_mesh'], v):+.2%} A {_err(row['surface_area_nm2'], a):+.2%} "
        f"(raw {_err(row['surface_area_nm2_raw'], a):+.2%}) 3D axes {row['axis_major_nm']:.1f}/"
        f"{row['axis_minor_nm']:.1f} vs exact {major:.1f}/{minor:.1f}"
    )
    assert mesh.is_watertight
    assert _rel(row["volume_nm3_voxels"], v) < 0.03
    assert _rel(row["volume_nm3_mesh"], v) < 0.03
    assert _rel(row["surface_area_nm2"], a) < 0.05
    assert _rel(row["axis_major_nm"], major) < 0.05
    assert _rel(row["axis_middle_nm"], minor) < 0.05
    assert _rel(row["axis_minor_nm"], minor) < 0.05

    # z slices cut the rod lengthwise: each is a stadium of half-width sqrt(r^2 - t^2) at height t
    r, h = d / 2, (length - d) / 2
    heights = np.arange(mask.shape[0]) * spacing[0] - centre[0]
    exact = np.array(
        [
            stadium(math.sqrt(r * r - t * t), h)
            for t, present in zip(heights, mask.any(axis=(1, 2)), strict=True)
            if present
        ]
    )
    xs = cross_sections(np.pad(mask, 1), spacing)
    print(
        f"rod cross-sections: minor mean {row['xs_minor_mean_nm']:.1f} (exact {exact[:, 1].mean():.1f}), "
        f"major mean {row['xs_major_mean_nm']:.1f} ({exact[:, 0].mean():.1f}), perimeter mean "
        f"{row['xs_perimeter_mean_nm']:.1f} ({exact[:, 2].mean():.1f}), widest minor {xs['minor'].max():.1f} "
        f"(mid-slice stadium {stadium(r, h)[1]:.1f}), xs_width_max {row['xs_width_max_nm']:.1f} (d {d})"
    )
    assert xs["n"] == len(exact)
    assert abs(row["xs_minor_mean_nm"] - exact[:, 1].mean()) < ISO[1]
    assert abs(row["xs_major_mean_nm"] - exact[:, 0].mean()) < ISO[1]
    assert _rel(row["xs_perimeter_mean_nm"], exact[:, 2].mean()) < 0.03
    assert abs(xs["minor"].max() - stadium(r, h)[1]) < ISO[1]  # widest slice: the stadium through the axis
    assert abs(row["xs_width_max_nm"] - d) < ISO[1]  # the rod's diameter within one voxel


def test_axes_equal_regionprops_with_anisotropic_spacing():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    blob = ndimage.gaussian_filter(rng.random((30, 40, 50)), 3) > 0.52
    lab, _ = ndimage.label(blob)
    blob = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    spacing = (20.0, 9.8, 7.0)
    m = moments(blob, spacing)
    rp = regionprops(blob.astype(np.uint8), spacing=spacing)[0]
    assert m["axes_nm"][0] == pytest.approx(rp.axis_major_length, rel=1e-9)
    assert m["axes_nm"][2] == pytest.approx(rp.axis_minor_length, rel=1e-9)
    assert m["centroid_nm"] == pytest.approx(tuple(rp.centroid), rel=1e-9)
    # slab accumulation (64 z slices at a time) is exact
    big = np.zeros((150, 8, 8), bool)
    big[3:140, 2:6, 1:7] = True
    assert moments(big, ISO)["centroid_nm"][0] == pytest.approx(np.mean(np.arange(3, 140)) * 9.8)


def test_cross_section_axes_equal_regionprops_and_taubin_equals_trimesh():
    import trimesh
    from scipy import ndimage
    from scripts.surfaces.measure import _ellipse_axes
    from scripts.surfaces.meshes import taubin

    rng = np.random.default_rng(5)
    blob = ndimage.gaussian_filter(rng.random((60, 70)), 4) > 0.5
    lab, _ = ndimage.label(blob)
    for r in regionprops(lab, spacing=(9.8, 7.0)):
        assert _ellipse_axes(r.coords, 9.8, 7.0) == pytest.approx(
            (r.axis_major_length, r.axis_minor_length), rel=1e-9, abs=1e-9
        )
    mesh = mask_surface(np.pad(ellipsoid_mask((60.0, 80.0, 100.0), ANISO)[0], 1), ANISO)
    ref = mesh.copy()
    trimesh.smoothing.filter_taubin(ref, lamb=0.5, nu=0.53, iterations=20)
    assert np.abs(taubin(mesh.vertices, mesh.faces, 10) - ref.vertices).max() < 1e-9


@pytest.mark.parametrize("angle", [0.0, 22.5, 30.0, 45.0, 80.0])
def test_caliper_width_of_digitised_strips(angle):
    yy, xx = np.mgrid[-80:81, -80:81].astype(float)
    rng = np.random.default_rng(int(angle))
    widths = []
    for _ in range(10):
        oy, ox = rng.random(2) - 0.5
        t = np.deg2rad(angle)
        across = (yy + oy) * np.cos(t) + (xx + ox) * np.sin(t)
        along = -(yy + oy) * np.sin(t) + (xx + ox) * np.cos(t)
        widths.append(caliper_width(np.argwhere((np.abs(across) <= 4.0) & (np.abs(along) <= 50)), 9.8, 9.8))
    assert np.mean(widths) == pytest.approx(8 * 9.8, abs=0.3 * 9.8)


def test_caliper_width_degenerate_sets():
    assert caliper_width(np.array([[3, 4]]), 9.8, 9.8) == pytest.approx(9.8)
    assert caliper_width(np.array([[0, 0], [0, 1], [0, 2]]), 20.0, 9.8) == pytest.approx(20.0)
    assert caliper_width(np.array([[0, 0], [1, 1], [2, 2]]), 1.0, 1.0) == pytest.approx(math.sqrt(0.5))


def test_marching_cubes_slabs_join_without_seams():
    mask = np.pad(ellipsoid_mask((100.0, 80.0, 120.0), ANISO)[0], 1)
    whole = mask_surface(mask, ANISO, slab=256)
    sliced = mask_surface(mask, ANISO, slab=3)
    assert whole.is_watertight and sliced.is_watertight
    assert len(sliced.faces) == len(whole.faces)
    assert sliced.volume == pytest.approx(whole.volume, rel=1e-12)
    assert sliced.area == pytest.approx(whole.area, rel=1e-12)


def test_mesh_coordinates_are_nm_xyz_of_voxel_centres():
    labels = np.zeros((12, 14, 16), np.int32)
    labels[3:7, 4:9, 5:12] = 1
    (obj,) = find_objects(labels)
    crop, origin = object_crop(labels, obj)
    mesh = mask_surface(crop, ANISO, origin)
    lo, hi = mesh.bounds
    # the 0.5 iso-surface of a box of voxels passes half a voxel outside the outer voxel centres
    assert lo == pytest.approx([4.5 * 9.8, 3.5 * 9.8, 2.5 * 20.0])
    assert hi == pytest.approx([11.5 * 9.8, 8.5 * 9.8, 6.5 * 20.0])
    assert mesh.volume == pytest.approx(7 * 5 * 4 * 9.8 * 9.8 * 20.0, rel=0.1)


def test_summary_uses_only_objects_off_the_border():
    rows = [
        {"touches_border": False, "volume_nm3_mesh": 1.0},
        {"touches_border": False, "volume_nm3_mesh": 3.0},
        {"touches_border": True, "volume_nm3_mesh": 100.0},
    ]
    s = summarize(rows, columns=["volume_nm3_mesh"])
    assert (s["n_objects"], s["n_border"], s["n_measured"]) == (3, 1, 2)
    assert s["stats"]["volume_nm3_mesh"]["mean"] == 2.0
    assert s["stats"]["volume_nm3_mesh"]["sd"] == pytest.approx(math.sqrt(2.0))
    empty = summarize([], columns=["volume_nm3_mesh"])
    assert empty["n_objects"] == 0 and math.isnan(empty["stats"]["volume_nm3_mesh"]["mean"])


# ----------------------------------------------------------------------------- degenerate meshes


@pytest.mark.parametrize(
    ("name", "smoothing", "degenerate"),
    [
        ("voxel", 25, True),
        ("voxel", 0, True),  # an octahedron of 1/6 the voxel: all cut corners
        ("filament", 25, True),
        ("filament", 0, True),
        ("diagonal", 25, True),
        ("strip", 25, True),  # 1 x 2 x 2: smoothing shrinks it to a speck
        ("strip", 0, False),
        ("cube2", 25, False),
        ("plate", 25, False),  # one voxel thin but wide: a proper surface
    ],
)
def test_objects_too_small_or_thin_for_a_mesh_get_nan_and_a_flag(name, smoothing, degenerate):
    sizes = {
        "voxel": (1, 1, 1),
        "filament": (1, 1, 12),
        "strip": (1, 2, 2),
        "cube2": (2, 2, 2),
        "plate": (1, 6, 7),
        "diagonal": (6, 6, 6),
    }
    mask = np.ones(sizes[name], bool)
    if name == "diagonal":  # voxels touching only at their corners
        mask = np.zeros_like(mask)
        mask[range(6), range(6), range(6)] = True
    row, mesh = _measure(mask, ANISO, smoothing)
    voxels = mask.sum() * math.prod(ANISO)
    assert row["voxel_count"] == mask.sum() and row["volume_nm3_voxels"] == pytest.approx(voxels)
    assert row["mesh_degenerate"] is degenerate
    assert mesh.is_watertight and 0 < row["volume_nm3_mesh_raw"] < voxels  # raw columns stay honest
    if degenerate:
        assert math.isnan(row["volume_nm3_mesh"]) and math.isnan(row["surface_area_nm2"])
        assert math.isnan(row["surface_to_volume_um-1"])
        # the exported mesh is the unsmoothed marching-cubes surface, not a collapsed speck
        assert mesh.volume == pytest.approx(row["volume_nm3_mesh_raw"])
    else:
        assert 0.5 * voxels <= row["volume_nm3_mesh"] <= 1.1 * voxels
        dz, dy, dx = (n * s for n, s in zip(mask.shape, ANISO, strict=True))
        box_area = 2 * (dz * dy + dy * dx + dz * dx)
        assert 0.5 * box_area < row["surface_area_nm2"] < 1.1 * box_area
