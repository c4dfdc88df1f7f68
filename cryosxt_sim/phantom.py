"""Cell phantoms for the cryo-SXT simulator: analytic geometry in nm, a LAC map, exact ground truth.

Objects are implicit surfaces painted with the primitives of ``geometry``. The phantom grid is the
FOV padded laterally in x (tilted rays see the slab beyond the FOV) and in z (the ice can be thicker
than the reconstructed volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cryosxt_sim.geometry import (
    GT_HALF_VOXELS,
    LAC,
    MARGIN_NM,
    MEMBRANE_NM,
    PROBE_DIRS,
    Block,
    Canvas,
    Cell,
    block_shape,
    ellipsoid_f,
    floats,
    gt_band,
    plain,
    rnd,
    rotation,
    sdf_ellipsoid,
    sdf_segment,
    sdf_sphere,
    segment_gap,
    shell,
    smin,
    smooth_noise,
    solid,
    unit2,
)
from cryosxt_sim.granules import scatter_granules
from cryosxt_sim.kinds import KINDS, CellKind, Sample
from cryosxt_sim.support import carbon_film
from cryosxt_sim.yeast import vacuoles, walled_cells

__all__ = ["DENSITY", "ORGANELLES", "GT_HALF_VOXELS", "LAC", "MEMBRANE_NM", "PairedLayout", "Phantom", "build_phantom"]


# ---------------------------------------------------------------- the phantom


@dataclass(frozen=True)
class PairedLayout:
    """What makes one phantom come out the same at two voxel sizes (``cryosxt_sim.paired``).

    Geometry is drawn in nm from the tomogram's stream, so only what depends on the grid must be
    pinned: the padding (in voxels of this grid, the same nm at both sizes), the drawing bounds and
    the voxel size behind "too small to draw" decisions (the coarse grid's), the raster step of the
    cell-area estimate (its Poisson means) and a separate stream for grid-sized noise (texture,
    film streaks), whose length would otherwise shift every later draw. The fine grid then sits
    half a fine voxel off the coarse one, far under the resolution.
    """

    pad: tuple[int, int]
    extent_nm: tuple[float, float, float]  # the coarse grid's (hi - lo): the same drawing bounds
    draw_voxel_nm: float  # the coarse voxel size
    area_step_nm: float
    texture_seed: tuple[int, ...]


@dataclass
class Phantom:
    mu: np.ndarray  # padded LAC map (1/um)
    membrane: np.ndarray  # FOV, uint8
    instances: np.ndarray  # FOV, uint16
    objects: list[dict]
    offset: tuple[int, int, int]
    info: dict


class Builder:
    """Places and paints the objects of one phantom, in drawing order."""

    def __init__(
        self,
        fov,
        voxel,
        pad,
        rng,
        fiducials,
        kind: CellKind | None = None,
        sample: Sample | None = None,
        layout: PairedLayout | None = None,
    ):
        self.rng = rng
        # Paired phantoms draw their grid-sized noise from a stream of its own (see PairedLayout).
        self.texture_rng = np.random.default_rng(layout.texture_seed) if layout else rng
        self.area_step_nm = layout.area_step_nm if layout else max(float(voxel) * 4, 40.0)
        self.kind = kind or KINDS["mammalian"]
        self.sample = sample = sample or Sample()
        self.lac = {**LAC, **sample.lac_overrides()}
        self.v = float(voxel)
        nz, ny, nx = fov
        self.fov_nm = np.array(fov, float) * self.v
        shape = (nz + 2 * pad[0], ny, nx + 2 * pad[1])
        self.cv = Canvas(tuple(fov), (pad[0], 0, pad[1]), shape, self.v)
        self.lo = -np.array(self.cv.offset, float) * self.v  # grid extent in nm
        self.hi = self.lo + (np.array(shape) - 1) * self.v
        self.dv = self.v  # the voxel size that decides what is drawn (too small to resolve, margins)
        if layout:  # draw as on the coarse grid: the same decisions at both voxel sizes
            self.hi, self.dv = self.lo + np.asarray(layout.extent_nm), layout.draw_voxel_nm
        self.fiducials = fiducials
        self.ice_z = (self.lo[0], self.hi[0])
        self.ice_occ = np.ones((1, 1, 1), np.float32)
        self.pm: tuple[Block, np.ndarray] | None = None
        self.objects: list[dict] = []
        self.occ_c = np.zeros((0, 3))
        self.occ_r = np.zeros(0)
        self.tex = smooth_noise(shape, (90.0 / self.v, 35.0 / self.v), (1.0, 0.6), self.texture_rng)

    # -- bookkeeping
    def add(self, kind: str, block: Block | None, membrane: bool, **params) -> int:
        """Register an object; returns its provisional id (0 if it never reaches the FOV)."""
        if not self.cv.touches_fov(block):
            return 0
        params = {k: plain(v) for k, v in params.items()}
        self.objects.append({"id": len(self.objects) + 1, "kind": kind, "membrane": membrane, **params})
        return len(self.objects)

    def half_room(self, cell: Cell) -> float:
        """Largest half height an organelle can use: the cell's, within the ice."""
        return min(cell.half_height, (self.ice_z[1] - self.ice_z[0]) / 2)

    def cut_at_faces(self) -> None:
        """Clip everything at the sample faces (sectioned cells end there): LAC, labels, instances."""
        self.cv.mu *= self.ice_occ
        oz = self.cv.offset[0]
        outside = self.ice_occ[oz : oz + self.cv.fov[0], 0, 0] < 0.5
        self.cv.membrane[outside] = 0
        self.cv.instances[outside] = 0

    def free(self, c: np.ndarray, r: np.ndarray) -> bool:
        if not len(self.occ_r):
            return True
        d = np.linalg.norm(c[:, None, :] - self.occ_c[None], axis=2)
        return bool(np.all(d >= r[:, None] + self.occ_r[None] + MARGIN_NM))

    def occupy(self, c: np.ndarray, r: np.ndarray) -> None:
        self.occ_c = np.vstack([self.occ_c, c])
        self.occ_r = np.concatenate([self.occ_r, r])

    def in_cell(self, cell: Cell, pts: np.ndarray, nucleus=None, in_ice: bool = True) -> bool:
        """All probe points inside the cell (and the ice), outside the nucleus frame if given."""
        if np.any(cell.f_points(pts) > -0.02):
            return False
        if in_ice and (pts[:, 0].min() < self.ice_z[0] or pts[:, 0].max() > self.ice_z[1]):
            return False
        if nucleus is not None and np.any(ellipsoid_f(pts, *nucleus) < 0.05):
            return False
        return True

    def _sample_xy(self, cell: Cell, in_fov: bool) -> tuple[float, float]:
        lo, hi = cell.bbox()
        if in_fov and self.kind.layout == "walled":  # several small cells: where this one meets the FOV
            lo, hi = np.maximum(lo, 0.0), np.minimum(hi, self.fov_nm)
            if np.all(hi[1:] > lo[1:]):
                return self.rng.uniform(lo[1], hi[1]), self.rng.uniform(lo[2], hi[2])
        if in_fov:
            return self.rng.uniform(0, self.fov_nm[1]), self.rng.uniform(0, self.fov_nm[2])
        return (
            self.rng.uniform(max(lo[1], self.lo[1]), min(hi[1], self.hi[1])),
            self.rng.uniform(max(lo[2], self.lo[2]), min(hi[2], self.hi[2])),
        )

    # -- slab and cells
    def ice(self, sectioned: bool) -> tuple[float, float]:
        if self.sample.ice_ratio is None:
            t = self.rng.uniform(1.05, 1.3) if sectioned else self.rng.uniform(0.8, 1.3)
        else:  # drawn with the sample; a section's faces stay outside the volume
            t = max(self.sample.ice_ratio, 1.05) if sectioned else self.sample.ice_ratio
        t *= self.fov_nm[0]
        t = min(t, self.hi[0] - self.lo[0] - 2 * self.dv)
        shift = 0.0 if sectioned else self.rng.uniform(-0.1, 0.1)  # sections: faces outside the FOV
        zc = self.fov_nm[0] / 2 - self.dv / 2 + shift * self.fov_nm[0]
        z0 = float(np.clip(zc - t / 2, self.lo[0] + self.dv, self.hi[0] - t - self.dv))
        b = self.cv.block(self.lo, self.hi)
        d = np.maximum(z0 - b.z, b.z - (z0 + t))  # slab as an implicit surface
        self.ice_occ = solid(d, self.v)  # (nz, 1, 1): everything is cut at the sample faces
        self.cv.paint(b, self.lac["ice"], self.ice_occ)
        self.ice_z = (z0, z0 + t)
        return self.ice_z

    def cells(self, ice: tuple[float, float], sectioned: bool) -> list[Cell]:
        """One or two cells. Sectioned: the cell is thicker than the sample slab and cut by its faces
        (the volume is a section through a thick cell); else the whole cell lies in the ice."""
        ctr = self.fov_nm / 2
        side = max(self.fov_nm[1], self.fov_nm[2])
        k = self.kind
        two = self.rng.random() < k.p_two
        n = 2 if two else 1
        ang0 = self.rng.uniform(0, 2 * np.pi)
        out = []
        for i in range(n):
            radius = self.rng.uniform(0.3, 0.5) * side if two else self.rng.uniform(*k.radius_one) * side
            ang = ang0 + np.pi * i
            dist = radius * (self.rng.uniform(1.15, 1.3) if two else self.rng.uniform(*k.dist_one))
            room = ice[1] - ice[0] - 2 * MARGIN_NM
            if sectioned:
                hh = self.rng.uniform(0.75, 2.0) * room
                zc = (ice[0] + ice[1]) / 2 + self.rng.uniform(-0.1, 0.1) * room
            else:
                hh = self.rng.uniform(0.4, 0.5) * room
                zc = ice[0] + MARGIN_NM + hh + self.rng.uniform(0, room - 2 * hh)
            amps = self.rng.uniform(0, 0.06, 4) / np.sqrt(np.arange(1, 5))
            out.append(
                Cell(
                    np.array([zc, ctr[1] + dist * np.sin(ang), ctr[2] + dist * np.cos(ang)]),
                    radius,
                    hh,
                    self.rng.uniform(3.0, 6.0),
                    amps,
                    self.rng.uniform(0, 2 * np.pi, 4),
                )
            )
        return out

    def paint_cell(self, cell: Cell, others: list[Cell]) -> None:
        filos = self._filopodia(cell, others) if self.kind.filopodia else []
        lo, hi = cell.bbox()
        lo, hi = lo - cell.wall_nm, hi + cell.wall_nm
        for p0, p1, r in filos:
            lo = np.minimum(lo, np.minimum(p0, p1) - r - 40.0)
            hi = np.maximum(hi, np.maximum(p0, p1) + r + 40.0)
        b = self.cv.block(lo - 2 * self.v, hi + 2 * self.v)  # contains every filopodium box below
        if b is None:
            return
        d_body = cell.sdf(b)
        d_cell = d_body.copy()
        parts = []  # (filopodium box, its slices in b, distance there)
        for p0, p1, r in filos:
            fb = self.cv.block(np.minimum(p0, p1) - r - 40.0, np.maximum(p0, p1) + r + 40.0)
            if fb is None:
                continue
            rel = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(fb.sl, b.sl, strict=True))
            df = sdf_segment(fb, p0, p1, r)
            d_cell[rel] = smin(d_cell[rel], df, 40.0)
            parts.append((fb, rel, df, (p0, p1, r)))
        if cell.wall_nm > 0:  # walled cells: the wall outside the plasma membrane, under the cytoplasm
            wall = solid(d_cell - np.float32(cell.wall_nm), self.v)
            self.cv.paint(b, cell.wall_lac + np.float32(0.03) * self.tex[b.sl], wall)
        self.cv.paint(b, self.lac["cytoplasm"] + np.float32(0.04) * self.tex[b.sl], solid(d_cell, self.v))
        for fb, rel, df, _ in parts:  # actin-rich filopodium core, outside the body
            self.cv.paint(fb, self.lac["actin"], solid(df, self.v) * (1 - solid(d_body[rel], self.v)))
        cid = self.add(
            "cell",
            b,
            True,
            center_nm=rnd(cell.center),
            radius_nm=round(cell.radius, 1),
            half_height_nm=round(cell.half_height, 1),
            profile_power=round(cell.power, 2),
        )
        self.cv.mark(b, d_cell <= 0, instance=cid)
        if cell.wall_nm > 0:  # not a lipid membrane: an instance, never in the mask
            wid = self.add(
                "cell_wall",
                b,
                False,
                parent=cid,
                thickness_nm=round(cell.wall_nm, 1),
                lac_per_um=round(cell.wall_lac, 3),
            )
            self.cv.mark(b, (d_cell > 0) & (d_cell <= cell.wall_nm), instance=wid)
        for fb, rel, df, (p0, p1, r) in parts:
            fid = self.add("filopodium", fb, True, parent=cid, **self._filo_params(cell, p0, p1, r))
            self.cv.mark(fb, (df < d_body[rel]) & (d_cell[rel] <= 0), instance=fid)
        self.pm = (b, d_cell)  # plasma membrane painted last, over the organelles

    def paint_plasma_membrane(self) -> None:
        if self.pm is None:
            return
        b, d = self.pm
        self.pm = None
        self.cv.paint(b, self.lac["membrane"], shell(d, MEMBRANE_NM, self.v))
        self.cv.mark(b, gt_band(d, self.v), membrane=True)

    def _filo_params(self, cell: Cell, p0, p1, r) -> dict:
        axis = p1 - p0
        total = float(np.linalg.norm(axis))
        t = np.linspace(0, 1, 2001)
        outside = cell.f_points(p0 + t[:, None] * axis) > 0
        t_exit = t[np.argmax(outside)] if outside.any() else 1.0
        return {
            "start_nm": rnd(p0),
            "end_nm": rnd(p1),
            "diameter_nm": round(2 * r, 1),
            "length_nm": round(total * (1 - t_exit) + r, 1),
        }

    def _filopodia(self, cell: Cell, others: list[Cell]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        out: list[tuple[np.ndarray, np.ndarray, float]] = []
        n = 1 + self.rng.poisson(4)
        ctr = self.fov_nm / 2
        for _ in range(30 * n):
            if len(out) >= n:
                break
            phi = self.rng.uniform(-np.pi, np.pi)
            rr, _ = cell._outline(phi)
            base = cell.center[1:] + 0.8 * rr * np.array([np.sin(phi), np.cos(phi)])
            edge = cell.center[1:] + rr * np.array([np.sin(phi), np.cos(phi)])
            if np.any(np.abs(edge - ctr[1:]) > 0.6 * self.fov_nm[1:]) and self.rng.random() < 0.8:
                continue  # prefer filopodia that reach into the field of view
            h = min(cell.half_height_at(*base), (self.ice_z[1] - self.ice_z[0]) / 2)
            r = min(self.rng.uniform(50.0, 150.0), 0.7 * h)
            if r < 1.2 * self.dv:
                continue
            zs = cell.center[0] + self.rng.uniform(-0.4, 0.4) * max(h - r, 0.0)
            psi = phi + self.rng.normal(0, 0.45)
            elev = 0.0 if self.rng.random() < 0.65 else self.rng.uniform(-0.35, 0.35)
            length = self.rng.uniform(400.0, 2500.0) + 0.2 * rr
            dirv = np.array([np.sin(elev), np.cos(elev) * np.sin(psi), np.cos(elev) * np.cos(psi)])
            z_lo, z_hi = self.ice_z[0] + r + MARGIN_NM, self.ice_z[1] - r - MARGIN_NM
            if z_hi < z_lo:
                continue
            p0 = np.array([np.clip(zs, z_lo, z_hi), *base])
            p1 = p0 + length * dirv
            p1[0] = np.clip(p1[0], z_lo, z_hi)  # filopodia stay in the ice
            pts = p0 + np.linspace(0.3, 1, 30)[:, None] * (p1 - p0)
            if any(np.any(o.f_points(pts) < 0.2) for o in others):
                continue
            if any(segment_gap(p0, p1, q0, q1) < r + s + MARGIN_NM for q0, q1, s in out):
                continue
            out.append((p0, p1, r))
        return out

    # -- organelles
    def place(self, cell: Cell, ext: np.ndarray, in_fov: bool, nucleus, tries: int = 40):
        """A centre (z, y, x) where a box of half extents `ext` fits inside the cell, or None."""
        for _ in range(tries):
            y, x = self._sample_xy(cell, in_fov)
            h = cell.half_height_at(y, x)
            z_lo = max(cell.center[0] - h, self.ice_z[0]) + ext[0] + MARGIN_NM
            z_hi = min(cell.center[0] + h, self.ice_z[1]) - ext[0] - MARGIN_NM
            if z_hi <= z_lo:
                continue
            c = np.array([self.rng.uniform(z_lo, z_hi), y, x])
            pts = c + PROBE_DIRS * (ext + MARGIN_NM)
            if self.in_cell(cell, pts, nucleus):
                return c
        return None

    def nucleus(self, cell: Cell):
        """Double-membraned nucleus near the cell centre, pulled towards the FOV; returns its frame."""
        if self.rng.random() > self.kind.p_nucleus:
            return None
        for _ in range(20):
            a = cell.radius * self.rng.uniform(*self.kind.nucleus_frac)
            radii = np.array([a, a * self.rng.uniform(0.65, 1.0), 0.0])
            to_fov = self.fov_nm / 2 - cell.center
            to_fov[0] = 0
            shift = to_fov * min(1.0, 0.35 * cell.radius / (np.linalg.norm(to_fov) + 1e-9))
            c = cell.center + shift * self.rng.uniform(0.3, 1.0)
            c[0] = cell.center[0]
            radii[2] = 0.85 * cell.half_height_at(c[1], c[2]) - MARGIN_NM
            if radii[2] < 4 * self.dv:
                return None
            th = self.rng.uniform(0, np.pi)
            rot = np.array([[0, 0, 1.0], [np.sin(th), np.cos(th), 0], [np.cos(th), -np.sin(th), 0]])
            pts = c + (PROBE_DIRS * (radii + MARGIN_NM)) @ rot.T
            if self.in_cell(cell, pts, in_ice=False):  # the nucleus may be cut by the faces
                break
            a *= 0.8
        else:
            return None
        sep = self.rng.uniform(30.0, 50.0)
        b = self.cv.block(c - radii.max() - self.v, c + radii.max() + self.v)
        if b is None:  # a large cell's nucleus can lie wholly outside the grid
            return None
        d = sdf_ellipsoid(b, c, radii, rot)
        t = self.tex[b.sl]
        # Heterochromatin lines the envelope: lateral distance only (z radius inflated), so the flat
        # top and bottom of a thin nucleus do not make all of it dense.
        d_lat = sdf_ellipsoid(b, c, radii * np.array([1.0, 1.0, 20.0]), rot)
        peripheral = np.exp(np.minimum(d_lat + sep, 0.0) / 70.0)
        chrom = self.lac["nucleoplasm"] + 0.18 / (1 + np.exp(-4 * (t - 1.0))) + 0.16 * peripheral
        d_in = d + sep  # inner envelope membrane
        core = d_in + 40  # nucleoli stay this far inside it
        self.cv.paint(b, self.lac["perinuclear"], solid(d, self.v))
        self.cv.paint(b, np.minimum(chrom, 0.5), solid(d_in, self.v))
        nid = self.add(
            "nucleus",
            b,
            True,
            center_nm=rnd(c),
            radii_nm=rnd(radii),
            axes=rnd(rot.T, 4),
            envelope_spacing_nm=round(sep, 1),
        )
        self.cv.mark(b, d <= 0, instance=nid)
        for _ in range(self.rng.integers(1, 3)):  # nucleoli: dense, no membrane
            rr = radii * self.rng.uniform(0.15, 0.3)
            off = (self.rng.uniform(-0.4, 0.4, 3) * radii) @ rot.T
            off[0] = 0
            rr[2] = min(rr[2], radii[2] * 0.5)
            db = sdf_ellipsoid(b, c + off, rr, rot)
            self.cv.paint(b, self.lac["nucleolus"] + 0.03 * t, solid(db, self.v) * solid(core, self.v))
            nb = self.cv.block(c + off - rr.max(), c + off + rr.max())
            oid = self.add(
                "nucleolus", nb, False, parent=nid, center_nm=rnd(c + off), radii_nm=rnd(rr), axes=rnd(rot.T, 4)
            )
            self.cv.mark(b, (db <= 0) & (core <= 0), instance=oid)
        for dd in (d, d_in):
            self.cv.paint(b, self.lac["membrane"], shell(dd, MEMBRANE_NM, self.v))
            self.cv.mark(b, gt_band(dd, self.v), membrane=True)
        self.occupy(c[None], np.array([radii.max()]))
        return (c, radii + MARGIN_NM, rot)

    def mitochondrion(self, cell: Cell, in_fov: bool, nucleus) -> None:
        rng = self.rng
        a = rng.uniform(*self.kind.mito_length_nm)
        bb = rng.uniform(*self.kind.mito_width_nm)
        psi = rng.uniform(0, np.pi)
        for _ in range(3):
            cc = min(bb * rng.uniform(0.8, 1.0), 0.6 * (self.half_room(cell) - MARGIN_NM))
            if cc < 4 * self.dv:
                return
            # flat cells hold flat-lying mitochondria: the tilt out of the slab plane is limited
            lim = min(0.15, 0.25 * self.half_room(cell) / a)
            elev = rng.uniform(-lim, lim)
            axis = np.array([np.sin(elev), np.cos(elev) * np.sin(psi), np.cos(elev) * np.cos(psi)])
            rot = rotation(axis, rng, roll=0.1)
            radii = np.array([a, bb, cc])
            ext = np.sqrt((rot**2) @ radii**2)  # bounding box of the rotated ellipsoid
            c = self.place(cell, ext, in_fov, nucleus)
            if c is None:
                a *= 0.75
                continue
            pts = c + np.linspace(-1, 1, 7)[:, None] * (a - bb) * axis
            if self.free(pts, np.full(7, bb)):
                break
            a *= 0.75
        else:
            return
        self.occupy(pts, np.full(7, bb))
        matrix, with_cristae = self.lac["mito_matrix"], True
        if self.sample.varied:  # grey-to-dark matrix; cristae in most, not all
            matrix, with_cristae = rng.uniform(0.33, 0.55), bool(rng.random() < 0.7)
        b = self.cv.block(c - ext, c + ext)
        d = sdf_ellipsoid(b, c, radii, rot)
        self.cv.paint(b, matrix + 0.02 * self.tex[b.sl], solid(d, self.v))
        # Cristae: membrane sheets across the long axis, each reaching in from one side.
        spacing = max(rng.uniform(80.0, 140.0), 5 * self.dv)
        n_c = int(2 * (a - bb * 0.5) // spacing) if with_cristae else 0
        cristae = np.full(block_shape(b), np.inf, np.float32)
        inner = -(MEMBRANE_NM + 0.5 * self.v + 10.0)
        for s in (np.arange(n_c) - (n_c - 1) / 2) * spacing:
            tilt = rot @ np.array([1.0, *rng.normal(0, 0.15, 2)])
            tilt /= np.linalg.norm(tilt)
            side = rot @ np.array([0.0, *unit2(rng)])
            depth = rng.uniform(-0.7, 0.3) * min(bb, cc)
            p, tl, sd, cf = floats(c + s * axis), floats(tilt), floats(side), floats(c)
            dc = (b.z - p[0]) * tl[0] + (b.y - p[1]) * tl[1] + (b.x - p[2]) * tl[2]
            reach = (b.z - cf[0]) * sd[0] + (b.y - cf[1]) * sd[1] + (b.x - cf[2]) * sd[2]
            dc = np.where((d <= inner) & (reach >= depth), np.abs(dc), np.inf)
            np.minimum(cristae, dc, out=cristae)
        mid = self.add(
            "mitochondrion", b, True, center_nm=rnd(c), semi_axes_nm=rnd(radii), axes=rnd(rot.T, 4), cristae=n_c
        )
        self.cv.mark(b, d <= 0, instance=mid)
        self.cv.paint(b, self.lac["membrane"], shell(cristae, MEMBRANE_NM, self.v))  # inf (no crista) -> 0
        self.cv.paint(b, self.lac["membrane"], shell(d, 1.5 * MEMBRANE_NM, self.v))  # outer + inner boundary
        self.cv.mark(b, gt_band(d, self.v) | gt_band(cristae, self.v), membrane=True)

    def sphere(self, cell: Cell, kind: str, in_fov: bool, nucleus) -> None:
        """Vesicle (membrane, variable lumen), lipid droplet (dense, no membrane) or granule."""
        rng = self.rng
        k = self.kind
        r = {
            "vesicle": lambda: math.exp(rng.uniform(math.log(k.vesicle_nm[0]), math.log(k.vesicle_nm[1]))),
            "droplet": lambda: rng.uniform(*k.droplet_nm),
            "granule": lambda: rng.uniform(12.0, 30.0),
        }[kind]()
        r = min(r, 0.75 * (self.half_room(cell) - MARGIN_NM))
        if kind != "granule" and r < 2.5 * self.dv:
            return
        c = self.place(cell, np.full(3, r), in_fov, nucleus, tries=15)
        if c is None or not self.free(c[None], np.array([r])):
            return
        b = self.cv.block(c - r, c + r)
        d = sdf_sphere(b, c, r)
        if kind == "granule":
            self.cv.paint(b, self.lac["granule"], solid(d, self.v))
            return
        self.occupy(c[None], np.array([r]))
        if kind == "droplet":
            lo = max(0.8, self.lac["membrane"] + 0.05) if self.sample.varied else 0.8  # the densest
            self.cv.paint(b, rng.uniform(lo, 1.05 if self.sample.varied else 1.0), solid(d, self.v))
        else:
            self.cv.paint(b, rng.uniform(0.12, 0.45), solid(d, self.v))
            self.cv.paint(b, self.lac["membrane"], shell(d, MEMBRANE_NM, self.v))
            self.cv.mark(b, gt_band(d, self.v), membrane=True)
        oid = self.add(kind, b, kind == "vesicle", center_nm=rnd(c), radius_nm=round(r, 1))
        self.cv.mark(b, d <= 0, instance=oid)

    def er(self, cell: Cell, in_fov: bool, nucleus) -> None:
        """A curved ER tubule: persistent random walk, mostly in the slab plane."""
        rng = self.rng
        r = min(rng.uniform(25.0, 45.0), 0.4 * self.half_room(cell))
        if r < 1.5 * self.dv:
            return
        c = self.place(cell, np.full(3, r), in_fov, nucleus, tries=15)
        if c is None:
            return
        step = max(60.0, 3 * r)
        heading, climb = rng.uniform(0, 2 * np.pi), 0.0
        pts = [c]
        for _ in range(int(rng.uniform(500.0, 2000.0) / step)):
            heading += rng.normal(0, 0.35)
            climb = 0.8 * climb + rng.normal(0, 0.05)
            q = pts[-1] + step * np.array(
                [np.sin(climb), np.cos(climb) * np.sin(heading), np.cos(climb) * np.cos(heading)]
            )
            fits = self.in_cell(cell, q + PROBE_DIRS * (r + MARGIN_NM), nucleus)
            if not fits or not self.free(q[None], np.array([r])):
                break
            pts.append(q)
        pts = np.array(pts)
        if len(pts) < 3 or not self.free(pts[:1], np.array([r])):
            return
        self.occupy(pts, np.full(len(pts), r))
        b = self.cv.block(pts.min(0) - r, pts.max(0) + r)
        d = np.full(block_shape(b), np.inf, np.float32)
        for p0, p1 in zip(pts[:-1], pts[1:], strict=True):
            np.minimum(d, sdf_segment(b, p0, p1, r), out=d)
        self.cv.paint(b, self.lac["er_lumen"], solid(d, self.v))
        self.cv.paint(b, self.lac["membrane"], shell(d, MEMBRANE_NM, self.v))
        self.cv.mark(b, gt_band(d, self.v), membrane=True)
        oid = self.add(
            "er",
            b,
            True,
            points_nm=[rnd(p) for p in pts],
            diameter_nm=round(2 * r, 1),
            length_nm=round(step * (len(pts) - 1), 1),
        )
        self.cv.mark(b, d <= 0, instance=oid)

    def gold(self, ice: tuple[float, float]) -> None:
        """Gold fiducials on the ice surfaces: opaque, no membrane, strong missing-wedge streaks."""
        for _ in range(self.rng.integers(self.fiducials[0], self.fiducials[1] + 1)):
            r = self.rng.uniform(50.0, 100.0)
            top = self.rng.random() < 0.5
            c = np.array(
                [
                    ice[1] + 0.3 * r if top else ice[0] - 0.3 * r,
                    self.rng.uniform(0, self.fov_nm[1]),
                    self.rng.uniform(-0.2, 1.2) * self.fov_nm[2],
                ]
            )
            b = self.cv.block(c - r, c + r)
            if b is None:
                continue
            d = sdf_sphere(b, c, r)
            self.cv.paint(b, self.lac["gold"], solid(d, self.v))
            oid = self.add("fiducial", b, False, center_nm=rnd(c), radius_nm=round(r, 1))
            self.cv.mark(b, d <= 0, instance=oid)


ORGANELLES = ("mitochondrion", "droplet", "vesicle", "er", "granule")  # drawing order
DENSITY = KINDS["mammalian"].density  # per um^2 of cell area (inside the FOV; half that in the padding)
GOLD_BEADS = (1, 4)  # background "gold": beads on the ice surfaces


def build_phantom(
    fov: tuple[int, int, int],
    voxel_nm: float,
    pad: tuple[int, int],
    rng: np.random.Generator,
    fiducials: tuple[int, int] = (0, 2),
    sample: Sample | None = None,
    layout: PairedLayout | None = None,
) -> Phantom:
    """Random cell phantom for an (nz, ny, nx) field of view; pad = (z, x) padding in voxels.

    sample: cell kind, organelle density, ice, background, appearance; the default is the mammalian
    phantom of the presets (same random numbers as before cell kinds existed). layout: only for
    phantoms that must come out the same at another voxel size (``cryosxt_sim.paired``).
    """
    sample = sample or Sample()
    one_by_one = sample == Sample()  # the presets' default keeps its original granule draws
    kind = KINDS[sample.cell]
    if sample.background == "gold":
        fiducials = GOLD_BEADS
    bld = Builder(fov, voxel_nm, pad, rng, fiducials, kind, sample, layout)
    # a slab thinner than the kind's whole cells (250 nm; yeast 2.6 um) is always a section through one
    sectioned = bool(rng.random() < kind.p_sectioned) or fov[0] * voxel_nm < kind.whole_min_nm
    ice = bld.ice(sectioned)
    cells = walled_cells(bld, ice, sectioned) if kind.layout == "walled" else bld.cells(ice, sectioned)
    for i, cell in enumerate(cells):
        bld.paint_cell(cell, cells[:i] + cells[i + 1 :])
        nuc = bld.nucleus(cell)
        if kind.vacuoles:
            vacuoles(bld, cell, nuc)
        area = _cell_area_um2(cell, bld)
        for in_fov, scale in ((True, 1.0), (False, 0.5)):
            for name in ORGANELLES:
                n = rng.poisson(kind.density[name] * sample.density * area[in_fov] * scale)
                if name == "granule" and not one_by_one:
                    scatter_granules(bld, cell, nuc, n, in_fov)
                    continue
                for _ in range(n):
                    if name == "mitochondrion":
                        bld.mitochondrion(cell, in_fov, nuc)
                    elif name == "er":
                        bld.er(cell, in_fov, nuc)
                    else:
                        bld.sphere(cell, name, in_fov, nuc)
        bld.paint_plasma_membrane()
    bld.cut_at_faces()
    bld.gold(ice)
    info = {
        "ice_nm": rnd(ice),
        "cells": len(cells),
        "sectioned": sectioned,
        "lac_per_um": bld.lac,
        "membrane_nm": MEMBRANE_NM,
        "gt_half_width_voxels": GT_HALF_VOXELS,
        "cell_kind": kind.name,
        "organelle_density_scale": sample.density,
        "background": sample.background,
    }
    if sample.background == "carbon":
        info["support"] = carbon_film(bld, ice)
    objects, instances = _finalise(bld)
    return Phantom(bld.cv.mu, bld.cv.membrane, instances, objects, bld.cv.offset, info)


def _cell_area_um2(cell: Cell, bld: Builder) -> dict[bool, float]:
    """Cell area (um^2) inside the FOV and in the whole grid, from a coarse outline raster."""
    step = bld.area_step_nm
    y = np.arange(bld.lo[1], bld.hi[1], step)
    x = np.arange(bld.lo[2], bld.hi[2], step)
    u2, _ = cell.u2(y[:, None], x[None, :])
    inside = u2 < 1
    in_fov = inside & ((x >= 0) & (x <= bld.fov_nm[2]))[None, :]
    px = step**2 * 1e-6
    return {True: float(in_fov.sum()) * px, False: float((inside & ~in_fov).sum()) * px}


def _finalise(bld: Builder) -> tuple[list[dict], np.ndarray]:
    """Renumber instances 1..N over objects present in the FOV; add voxel counts and clipping."""
    inst = bld.cv.instances
    counts = np.bincount(inst.ravel(), minlength=len(bld.objects) + 1)
    lut = np.zeros(len(bld.objects) + 1, np.uint16)
    kept = [obj for obj in bld.objects if counts[obj["id"]] > 0]
    for new_id, obj in enumerate(kept, start=1):
        lut[obj["id"]] = new_id
    inst = lut[inst]
    boxes = ndimage.find_objects(inst)
    for new_id, obj in enumerate(kept, start=1):
        obj["voxels"] = int(counts[obj["id"]])
        obj["id"] = new_id
        if "parent" in obj:
            obj["parent"] = int(lut[obj["parent"]]) or None
        box = boxes[new_id - 1]
        obj["clipped"] = any(s.start == 0 or s.stop == n for s, n in zip(box, inst.shape, strict=True))
    return kept, inst
