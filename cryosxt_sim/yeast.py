"""Walled cells (yeast-like) for the cryo-SXT phantoms: round cells with a thick wall, and vacuoles.

Why separate from the mammalian builder: the layout differs (cells have a physical size, 1.5-2.8 um
in radius, so a 40 nm volume shows several and a 10 nm one part of one) and vacuoles exist only
here. Labels: the plasma membrane inside the wall and the vacuole membrane (tonoplast) are lipid
membranes and in the mask; the cell wall (polysaccharide) and the dense polyphosphate bodies in
the vacuoles are not.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cryosxt_sim.geometry import (
    MARGIN_NM,
    MEMBRANE_NM,
    Cell,
    ellipsoid_f,
    gt_band,
    rnd,
    sdf_ellipsoid,
    sdf_sphere,
    shell,
    solid,
)

if TYPE_CHECKING:
    from cryosxt_sim.phantom import Builder

WALL_LAC = (0.38, 0.55)  # 1/um: glucan/mannan wall, denser than cytoplasm, lighter than droplets
VACUOLE_LAC = (0.12, 0.2)  # near water: the lightest compartment of the cell
POLYP_LAC = (0.6, 0.75)  # polyphosphate bodies inside vacuoles
MAX_CELLS = 6
_g = np.linspace(-1, 1, 9)
_BALL = np.stack(np.meshgrid(_g, _g, _g, indexing="ij"), -1).reshape(-1, 3)
_BALL = _BALL[np.linalg.norm(_BALL, axis=1) <= 1.0]  # points filling the unit ball


def walled_cells(bld: Builder, ice: tuple[float, float], sectioned: bool) -> list[Cell]:
    """Non-overlapping walled cells that reach the field of view, the first one over its centre."""
    rng, k = bld.rng, bld.kind
    fov = bld.fov_nm[1:]
    room = ice[1] - ice[0] - 2 * MARGIN_NM
    out: list[Cell] = []
    for _ in range(60):
        if len(out) >= MAX_CELLS:
            break
        r = math.exp(rng.uniform(math.log(k.radius_nm[0]), math.log(k.radius_nm[1])))
        wall = rng.uniform(*k.wall_nm)
        amps = rng.uniform(0, 0.03, 4) / np.sqrt(np.arange(1, 5))
        if not out:
            yx = fov / 2 + rng.uniform(-0.4, 0.4, 2) * min(r, fov.min() / 2)
        else:
            yx = rng.uniform(-0.25, 1.25, 2) * fov
        if np.linalg.norm(yx - np.clip(yx, 0, fov)) > 0.9 * r:
            continue  # its inside misses the field of view
        reach = r * (1 + amps.sum()) + wall
        gap = [np.linalg.norm(yx - o.center[1:]) - o.radius * (1 + o.amps.sum()) - o.wall_nm for o in out]
        if min(gap, default=np.inf) < reach + MARGIN_NM:
            continue
        if sectioned:  # round cells, thicker than the slab: cut by its faces
            hh = max(r * rng.uniform(0.8, 0.95), rng.uniform(0.75, 1.2) * room)
            zc = (ice[0] + ice[1]) / 2 + rng.uniform(-0.1, 0.1) * room
        else:  # whole cells in the ice, wall included (squashed where the ice is thin)
            inner = max(room - 2 * wall, 0.2 * room)
            hh = min(r * rng.uniform(0.8, 0.95), rng.uniform(0.4, 0.5) * inner)
            zc = ice[0] + MARGIN_NM + wall + hh + rng.uniform(0, max(inner - 2 * hh, 0.0))
        out.append(
            Cell(
                np.array([zc, *yx]),
                r,
                hh,
                rng.uniform(2.0, 2.6),
                amps,
                rng.uniform(0, 2 * np.pi, 4),
                wall_nm=wall,
                wall_lac=rng.uniform(*WALL_LAC),
            )
        )
    return out


def _clear(c: np.ndarray, radii: np.ndarray, rot: np.ndarray, nucleus, placed) -> bool:
    """No overlap with the nucleus (its exact frame, tested on points filling the vacuole: the
    builder's sphere test would keep large vacuoles out of small cells) or earlier vacuoles."""
    if any(np.linalg.norm(c - q) < radii.max() + r + MARGIN_NM for q, r in placed):
        return False
    return nucleus is None or bool(np.all(ellipsoid_f(c + (_BALL * radii) @ rot.T, *nucleus) > 0))


def vacuoles(bld: Builder, cell: Cell, nucleus) -> None:
    """1-3 large light compartments bounded by a membrane, some with dense polyphosphate bodies."""
    rng, v = bld.rng, bld.v
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(1 + min(int(rng.poisson(bld.kind.vacuoles)), 2)):
        a = cell.radius * rng.uniform(0.18, 0.35)
        radii = np.array([a, a * rng.uniform(0.8, 1.0), a * rng.uniform(0.75, 1.0)])
        radii[2] = min(radii[2], 0.8 * (bld.half_room(cell) - MARGIN_NM))  # third axis along z
        if radii[2] < 2.5 * bld.dv:
            return
        th = rng.uniform(0, np.pi)
        rot = np.array([[0, 0, 1.0], [np.sin(th), np.cos(th), 0], [np.cos(th), -np.sin(th), 0]])
        ext = np.sqrt((rot**2) @ radii**2)
        for _ in range(10):
            c = bld.place(cell, ext, False, nucleus, tries=10)
            if c is not None and _clear(c, radii, rot, nucleus, placed):
                break
        else:
            continue
        placed.append((c, radii.max()))
        bld.occupy(c[None], radii[:1])
        b = bld.cv.block(c - ext, c + ext)
        d = sdf_ellipsoid(b, c, radii, rot)
        lumen = rng.uniform(*VACUOLE_LAC)
        bld.cv.paint(b, lumen + np.float32(0.02) * bld.tex[b.sl], solid(d, v))
        inner = solid(d + np.float32(MEMBRANE_NM + v), v)  # bodies stay off the membrane
        n_bodies = int(rng.integers(0, 5))
        for _ in range(n_bodies):
            off = (rng.uniform(-0.5, 0.5, 3) * radii) @ rot.T
            db = sdf_sphere(b, c + off, rng.uniform(25.0, 70.0))
            bld.cv.paint(b, rng.uniform(*POLYP_LAC), solid(db, v) * inner)
        bld.cv.paint(b, bld.lac["membrane"], shell(d, MEMBRANE_NM, v))
        bld.cv.mark(b, gt_band(d, v), membrane=True)
        vid = bld.add(
            "vacuole",
            b,
            True,
            center_nm=rnd(c),
            radii_nm=rnd(radii),
            axes=rnd(rot.T, 4),
            lumen_lac_per_um=round(lumen, 3),
            polyphosphate_bodies=n_bodies,
        )
        bld.cv.mark(b, d <= 0, instance=vid)
