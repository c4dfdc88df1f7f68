"""The sample support of the cryo-SXT phantoms: a holey carbon film under the ice.

Why it matters: cells grow on a carbon-coated grid; the film is denser than anything in the cell,
laterally unbounded, and its hole edges and thickness streaks turn into the streaky, tilt-dependent
background of real reconstructions (through the missing wedge, even when the film lies outside the
reconstructed volume). Not a membrane: never in the mask; an instance where it is in the volume.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cryosxt_sim.geometry import solid

if TYPE_CHECKING:
    from cryosxt_sim.phantom import Builder

CARBON_LAC = 1.5  # 1/um: amorphous carbon (about 2 g/cm^3) above the carbon K edge


def _smooth_1d(coord: np.ndarray, corr: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance value noise along one coordinate (nm), correlation length `corr`."""
    knots = np.arange(float(coord.min()) - corr, float(coord.max()) + 2 * corr, corr)
    return np.interp(coord, knots, rng.standard_normal(knots.size)).astype(np.float32)


def _streaks(across: np.ndarray, along: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Relative thickness: ridges across (40-80 nm wide) whose strength fades in and out along (~1 um)."""
    ridges = _smooth_1d(across, rng.uniform(40.0, 80.0), rng)
    strength = np.abs(_smooth_1d(along, 1000.0, rng))
    return np.clip(1.0 + 0.4 * ridges * strength, 0.3, 2.0)


def carbon_film(bld: Builder, ice: tuple[float, float]) -> dict:
    """Paint a 12-30 nm carbon film just under the ice, with round holes (1-2.4 um) on a square
    lattice (2-4 um pitch, as Quantifoil-type grids) and streaked thickness. Returns its parameters."""
    rng, v = bld.rng, bld.v
    t = rng.uniform(12.0, 30.0)
    pitch = rng.uniform(2000.0, 4000.0)
    hole = pitch * rng.uniform(0.45, 0.6)
    phi, psi = rng.uniform(0, math.pi / 2), rng.uniform(0, math.pi)
    off = rng.uniform(0, pitch, 2)
    z1 = ice[0]
    z0 = z1 - t
    params = {
        "thickness_nm": round(t, 1),
        "z_nm": [round(z0, 1), round(z1, 1)],
        "hole_diameter_nm": round(hole),
        "pitch_nm": round(pitch),
        "lac_per_um": CARBON_LAC,
    }
    b = bld.cv.block(np.array([z0 - v, bld.lo[1], bld.lo[2]]), np.array([z1 + v, bld.hi[1], bld.hi[2]]))
    if b is None:
        return params
    d_sheet = np.maximum(z0 - b.z, b.z - z1)
    u = b.y * np.float32(math.cos(phi)) + b.x * np.float32(math.sin(phi)) - np.float32(off[0])
    w = b.x * np.float32(math.cos(phi)) - b.y * np.float32(math.sin(phi)) - np.float32(off[1])
    u = np.mod(u, np.float32(pitch)) - np.float32(pitch / 2)
    w = np.mod(w, np.float32(pitch)) - np.float32(pitch / 2)
    d_hole = np.hypot(u, w) - np.float32(hole / 2)  # negative inside a hole
    across = b.x * np.float32(math.cos(psi)) - b.y * np.float32(math.sin(psi))
    along = b.y * np.float32(math.cos(psi)) + b.x * np.float32(math.sin(psi))
    film = solid(d_sheet, v) * solid(-d_hole, v)
    bld.cv.paint(b, np.float32(CARBON_LAC) * _streaks(across, along, bld.texture_rng), film)
    fid = bld.add("support_film", b, False, **params)
    bld.cv.mark(b, film > 0.5, instance=fid)
    return params
