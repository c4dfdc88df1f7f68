"""Geometry of the cryo-SXT phantoms: grids, signed distances, partial-volume painting, texture.

Why a module of its own: every cell kind (``phantom``, ``yeast``) and the sample support
(``support``) paint with the same primitives. Every object is an implicit surface with an
(approximate) signed distance d in nm (negative inside); the LAC map is painted with partial-volume
occupancies of d, the ground truth is the band |d| <= 1.25 voxels around each membrane surface
(2-3 voxels thick at any voxel size). Coordinates: (z, y, x) in nm, voxel (0, 0, 0) of the field
of view (FOV) at the origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

LAC = {
    "ice": 0.109,
    "cytoplasm": 0.30,
    "actin": 0.38,
    "nucleoplasm": 0.22,
    "heterochromatin": 0.42,
    "nucleolus": 0.48,
    "perinuclear": 0.20,
    "mito_matrix": 0.42,
    "membrane": 0.80,
    "er_lumen": 0.22,
    "granule": 0.55,
    "gold": 15.0,
}
MEMBRANE_NM = 25.0  # apparent thickness of a membrane (bilayer + bound protein) in the image
GT_HALF_VOXELS = 1.25  # ground truth = |d| <= 1.25 voxels: 2-3 voxels thick
MARGIN_NM = 20.0  # minimum gap between placed objects

PROBE_DIRS = np.array(
    [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)], dtype=np.float64
)  # probe directions for fit tests
PROBE_DIRS /= np.linalg.norm(PROBE_DIRS, axis=1, keepdims=True)


# ---------------------------------------------------------------- grid and painting


@dataclass
class Block:
    """A box of the phantom grid: slices, open-grid nm coordinates, and its part inside the FOV."""

    sl: tuple[slice, slice, slice]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    fov_sl: tuple[slice, slice, slice] | None
    sub_sl: tuple[slice, slice, slice] | None


@dataclass
class Canvas:
    """LAC map on the padded grid; membrane mask and instance map on the FOV."""

    fov: tuple[int, int, int]
    offset: tuple[int, int, int]  # padded index of FOV voxel (0, 0, 0)
    shape: tuple[int, int, int]
    voxel: float
    mu: np.ndarray = field(init=False)
    membrane: np.ndarray = field(init=False)
    instances: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mu = np.zeros(self.shape, np.float32)
        self.membrane = np.zeros(self.fov, np.uint8)
        self.instances = np.zeros(self.fov, np.uint16)

    def block(self, lo_nm, hi_nm) -> Block | None:
        """The grid box covering [lo, hi] (nm), clipped to the grid; None if empty."""
        sl, fsl, ssl, coords = [], [], [], []
        for a in range(3):
            i0 = max(0, int(math.floor(lo_nm[a] / self.voxel)) + self.offset[a] - 1)
            i1 = min(self.shape[a], int(math.ceil(hi_nm[a] / self.voxel)) + self.offset[a] + 2)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
            f0, f1 = max(i0 - self.offset[a], 0), min(i1 - self.offset[a], self.fov[a])
            fsl.append(slice(f0, f1) if f1 > f0 else None)
            ssl.append(slice(f0 + self.offset[a] - i0, f1 + self.offset[a] - i0) if f1 > f0 else None)
            c = ((np.arange(i0, i1) - self.offset[a]) * self.voxel).astype(np.float32)
            shape = [1, 1, 1]
            shape[a] = -1
            coords.append(c.reshape(shape))
        inside = all(s is not None for s in fsl)
        return Block(tuple(sl), *coords, tuple(fsl) if inside else None, tuple(ssl) if inside else None)

    def paint(self, b: Block, value, alpha: np.ndarray) -> None:
        """Alpha-blend `value` (scalar or array) into the LAC map."""
        m = self.mu[b.sl]
        m += alpha * (value - m)

    def mark(self, b: Block, mask: np.ndarray, instance: int = 0, membrane: bool = False) -> None:
        """Write an instance id and/or membrane label where `mask` holds, inside the FOV."""
        if b.fov_sl is None:
            return
        sub = np.broadcast_to(mask, block_shape(b))[b.sub_sl]
        if membrane:
            self.membrane[b.fov_sl][sub] = 1
        if instance:
            self.instances[b.fov_sl][sub] = instance

    def touches_fov(self, b: Block | None) -> bool:
        return b is not None and b.fov_sl is not None


def block_shape(b: Block) -> tuple[int, int, int]:
    return (b.z.shape[0], b.y.shape[1], b.x.shape[2])


def solid(d: np.ndarray, v: float) -> np.ndarray:
    """Partial-volume occupancy of the inside (d < 0) of a surface, voxel size v."""
    out = np.multiply(d, np.float32(-1.0 / v), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def shell(d: np.ndarray, t: float, v: float) -> np.ndarray:
    """Occupancy of a sheet of thickness t centred on d = 0: overlap of [-t/2, t/2] with the voxel."""
    ad = np.abs(d, dtype=np.float32)
    hi = np.minimum(ad + np.float32(v / 2), np.float32(t / 2))
    ad -= np.float32(v / 2)
    np.maximum(ad, np.float32(-t / 2), out=ad)
    hi -= ad
    np.clip(hi, 0.0, None, out=hi)
    hi *= np.float32(1.0 / v)
    return hi


def gt_band(d: np.ndarray, v: float) -> np.ndarray:
    """Ground-truth membrane: voxel centres within 1.25 voxels of the surface."""
    return np.abs(d) <= GT_HALF_VOXELS * v


# ---------------------------------------------------------------- signed distances


def floats(v) -> list[float]:
    """Python floats, so float32 grids stay float32 (NumPy 2 scalars are not 'weak')."""
    return [float(a) for a in np.ravel(v)]


def sdf_sphere(b: Block, c, r: float) -> np.ndarray:
    c = floats(c)
    return np.sqrt((b.z - c[0]) ** 2 + (b.y - c[1]) ** 2 + (b.x - c[2]) ** 2) - np.float32(r)


def sdf_ellipsoid(b: Block, c, radii, rot: np.ndarray) -> np.ndarray:
    """First-order distance to an ellipsoid; rot columns are its axes in (z, y, x)."""
    c, radii, r = floats(c), floats(radii), np.asarray(rot, np.float64)
    dz, dy, dx = b.z - c[0], b.y - c[1], b.x - c[2]
    k0 = np.zeros(1, np.float32)
    k1 = np.zeros(1, np.float32)
    for i in range(3):
        q = float(r[0, i]) * dz + float(r[1, i]) * dy + float(r[2, i]) * dx
        k0 = k0 + (q * (1.0 / radii[i])) ** 2
        k1 = k1 + (q * (1.0 / radii[i] ** 2)) ** 2
    k0, k1 = np.sqrt(k0), np.sqrt(k1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def ellipsoid_f(points: np.ndarray, c, radii, rot: np.ndarray) -> np.ndarray:
    """Implicit value |q| - 1 at (n, 3) points (negative inside)."""
    q = (points - np.asarray(c)) @ rot / np.asarray(radii)
    return np.linalg.norm(q, axis=1) - 1.0


def sdf_segment(b: Block, p0, p1, r: float) -> np.ndarray:
    """Exact distance to a capsule (segment p0-p1 of radius r)."""
    p0 = floats(p0)
    a = [q - p for q, p in zip(floats(p1), p0, strict=True)]
    aa = sum(x * x for x in a) or 1e-9
    dz, dy, dx = b.z - p0[0], b.y - p0[1], b.x - p0[2]
    t = np.clip((dz * a[0] + dy * a[1] + dx * a[2]) * (1.0 / aa), 0.0, 1.0)
    return np.sqrt((dz - t * a[0]) ** 2 + (dy - t * a[1]) ** 2 + (dx - t * a[2]) ** 2) - float(r)


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union (polynomial smooth minimum) with a fillet of size k nm."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.minimum(a, b) - h * h * k * 0.25


def rotation(axis: np.ndarray, rng: np.random.Generator, roll: float = 0.3) -> np.ndarray:
    """Orthonormal frame (columns, in (z, y, x)) whose first column is `axis`, second as flat as possible."""
    a = axis / np.linalg.norm(axis)
    up = np.array([1.0, 0.0, 0.0])
    b = np.cross(a, up)
    if np.linalg.norm(b) < 1e-6:
        b = np.cross(a, np.array([0.0, 1.0, 0.0]))
    b /= np.linalg.norm(b)
    c = np.cross(a, b)
    ang = rng.uniform(-roll, roll)  # small roll about the long axis
    b, c = math.cos(ang) * b + math.sin(ang) * c, -math.sin(ang) * b + math.cos(ang) * c
    return np.stack([a, b, c], axis=1)


# ---------------------------------------------------------------- texture


def smooth_noise(
    shape: tuple[int, int, int], steps: tuple[float, ...], weights: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance sum of value-noise octaves with correlation lengths `steps` (voxels).

    Octaves are summed on the finest coarse grid, then upsampled once (trilinear, torch: fast
    and, unlike small BLAS products, robust on a busy machine).
    """
    import torch
    import torch.nn.functional as F

    fine = max(min(steps), 2.0)
    cshape = tuple(int(math.ceil((n - 1) / fine)) + 2 for n in shape)
    coarse = np.zeros(cshape, np.float32)
    for step, w in zip(steps, weights, strict=True):
        if step <= fine:
            oct_ = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), 0.7)
        else:
            oct_ = smooth_noise(cshape, (step / fine,), (1.0,), rng)
        coarse += np.float32(w) * (oct_ - oct_.mean()) / (oct_.std() + 1e-6)
    up = F.interpolate(torch.from_numpy(coarse)[None, None], size=tuple(shape), mode="trilinear", align_corners=True)
    out = up[0, 0].numpy()
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


# ---------------------------------------------------------------- cell body


@dataclass
class Cell:
    """Flattened cell body: wobbly outline R(phi) in xy, superellipse profile in z."""

    center: np.ndarray  # (z, y, x) nm
    radius: float
    half_height: float
    power: float
    amps: np.ndarray
    phases: np.ndarray
    wall_nm: float = 0.0  # walled cells (yeast): wall thickness outside the plasma membrane
    wall_lac: float = 0.0

    def _outline(self, phi):
        k = np.arange(2, 2 + len(self.amps)).reshape((-1,) + (1,) * np.ndim(phi))
        a = self.amps.reshape(k.shape)
        ph = self.phases.reshape(k.shape)
        r = self.radius * (1.0 + (a * np.cos(k * phi + ph)).sum(0))
        dr = self.radius * (-(a * k * np.sin(k * phi + ph)).sum(0))
        return r, dr

    def u2(self, y, x):
        """(rho / R(phi))^2 and its squared gradient magnitude (per nm^2) in xy."""
        dy, dx = y - self.center[1], x - self.center[2]
        rho = np.hypot(dy, dx)
        r, dr = self._outline(np.arctan2(dy, dx))
        u = rho / r
        return u * u, 4.0 * u * u * (1.0 + (dr / r) ** 2) / r**2

    def wz(self, z):
        w = np.abs(z - self.center[0]) / self.half_height
        return w**self.power, (self.power * w ** (self.power - 1.0) / self.half_height) ** 2

    def sdf(self, b: Block) -> np.ndarray:
        """First-order distance f / |grad f| (nm); exact on the surface, used near it."""
        u2, gu = (a.astype(np.float32) for a in self.u2(b.y.astype(np.float64), b.x.astype(np.float64)))
        wp, gw = (a.astype(np.float32) for a in self.wz(b.z.astype(np.float64)))
        f = u2 + (wp - np.float32(1.0))
        g = gu + (gw + np.float32(1e-12))
        np.sqrt(g, out=g)
        f /= g
        return f

    def f_points(self, p: np.ndarray) -> np.ndarray:
        u2, _ = self.u2(p[:, 1], p[:, 2])
        wp, _ = self.wz(p[:, 0])
        return u2 + wp - 1.0

    def half_height_at(self, y: float, x: float) -> float:
        u2, _ = self.u2(np.array([y]), np.array([x]))
        return float(self.half_height * max(0.0, 1.0 - u2[0]) ** (1.0 / self.power))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radius * (1.0 + np.abs(self.amps).sum())
        ext = np.array([self.half_height, r, r])
        return self.center - ext, self.center + ext


# ---------------------------------------------------------------- small helpers


def plain(v):
    """JSON-ready Python value (NumPy scalars -> float/int)."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def rnd(v, digits: int = 2) -> list:
    return np.round(np.asarray(v, np.float64), digits).tolist()


def unit2(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    return np.array([np.cos(a), np.sin(a)])


def segment_gap(p0, p1, q0, q1) -> float:
    """Approximate minimum distance between two segments (dense sampling)."""
    t = np.linspace(0, 1, 25)[:, None]
    a = p0 + t * (p1 - p0)
    b = q0 + t * (q1 - q0)
    return float(np.min(np.linalg.norm(a[:, None] - b[None], axis=2)))
