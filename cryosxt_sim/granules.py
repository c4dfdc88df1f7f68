"""Granules in bulk: the small dense particles (12-30 nm radius) of the cytoplasm, all at once.

Why not one by one like the organelles: a crowded section at 40 nm voxels holds tens of thousands
of them, and placing each by rejection took most of a tomogram's time. Here they are drawn in one
batch and kept where they fit (inside the cell and the ice, outside the nucleus and the placed
organelles); those smaller than a voxel are splatted as trilinear partial-volume fractions, larger
ones painted as spheres. Texture only: no label, no instance. Every phantom uses this except the
presets' default sample, which keeps its original draws (so existing data stay bit-identical).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cryosxt_sim.geometry import MARGIN_NM, Cell, ellipsoid_f, sdf_sphere, solid

if TYPE_CHECKING:
    from cryosxt_sim.phantom import Builder

GRANULE_NM = (12.0, 30.0)
_CHUNK = 2048


def _clear_of_objects(bld: Builder, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Which granules keep the placement margin from every placed organelle (bounding spheres)."""
    ok = np.ones(len(r), bool)
    if not len(bld.occ_r):
        return ok
    for i in range(0, len(r), _CHUNK):
        d = np.linalg.norm(c[i : i + _CHUNK, None, :] - bld.occ_c[None], axis=2)
        ok[i : i + _CHUNK] = np.all(d >= r[i : i + _CHUNK, None] + bld.occ_r[None] + MARGIN_NM, axis=1)
    return ok


def _splat(bld: Builder, c: np.ndarray, r: np.ndarray, lac: float) -> None:
    """Blend sub-voxel granules into the 8 voxels around each centre, alpha = weight x volume fraction."""
    v = bld.v
    pos = c / v + np.asarray(bld.cv.offset, float)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    vol = (4.0 / 3.0 * math.pi * r**3) / v**3
    mu = bld.cv.mu
    for corner in np.ndindex(2, 2, 2):
        idx = i0 + np.array(corner)
        w = np.prod(np.where(np.array(corner), frac, 1.0 - frac), axis=1)
        inside = np.all((idx >= 0) & (idx < np.array(mu.shape)), axis=1)
        iz, iy, ix = idx[inside].T
        alpha = np.minimum(w[inside] * vol[inside], 1.0).astype(np.float32)
        np.add.at(mu, (iz, iy, ix), alpha * (np.float32(lac) - mu[iz, iy, ix]))


def scatter_granules(bld: Builder, cell: Cell, nucleus, n: int, in_fov: bool) -> None:
    """Up to `n` granules in `cell`, drawn where it meets the FOV (in_fov) or anywhere on the grid."""
    if n <= 0:
        return
    rng, v = bld.rng, bld.v
    lo, hi = cell.bbox()
    lo_yx = np.maximum(lo[1:], 0.0 if in_fov else bld.lo[1:])
    hi_yx = np.minimum(hi[1:], bld.fov_nm[1:] if in_fov else bld.hi[1:])
    if np.any(hi_yx <= lo_yx):
        return
    yx = rng.uniform(lo_yx, hi_yx, size=(n, 2))
    r = rng.uniform(*GRANULE_NM, size=n)
    u2, _ = cell.u2(yx[:, 0], yx[:, 1])
    h = cell.half_height * np.maximum(0.0, 1.0 - u2) ** (1.0 / cell.power)
    z_lo = np.maximum(cell.center[0] - h, bld.ice_z[0]) + r + MARGIN_NM
    z_hi = np.minimum(cell.center[0] + h, bld.ice_z[1]) - r - MARGIN_NM
    c = np.column_stack([z_lo + rng.random(n) * (z_hi - z_lo), yx])
    ok = (z_hi > z_lo) & (cell.f_points(c) < -0.02)
    if nucleus is not None:
        ok &= ellipsoid_f(c, *nucleus) > 0.05
    ok[ok] = _clear_of_objects(bld, c[ok], r[ok])
    c, r = c[ok], r[ok]
    lac = bld.lac["granule"]
    big = r >= v
    for ci, ri in zip(c[big], r[big], strict=True):
        b = bld.cv.block(ci - ri, ci + ri)
        if b is not None:
            bld.cv.paint(b, lac, solid(sdf_sphere(b, ci, ri), v))
    _splat(bld, c[~big], r[~big], lac)
