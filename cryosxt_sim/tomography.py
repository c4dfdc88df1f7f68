"""Parallel-beam tilt-series acquisition and SIRT reconstruction for the cryo-SXT simulator.

Geometry: the tilt axis is y, so every y row is an independent 2D (z, x) problem. One sparse
projection matrix (Joseph's method) per (nz, nx, detector, angles) is built once, cached, and
applied to all y rows at once as a sparse x dense product (torch CSR, multithreaded).
At tilt theta the beam runs along (x, z) = (sin theta, cos theta); detector coordinate
t = x cos theta - z sin theta, in voxels, centred on the volume centre.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

Y_CHUNK = 64  # y rows per sparse product: the dense operand then stays in cache


def tilt_angles(max_deg: float, step_deg: float) -> np.ndarray:
    """Symmetric tilt angles -max..+max (degrees) with the given step."""
    n = int(np.floor(max_deg / step_deg + 1e-6))
    return np.arange(-n, n + 1, dtype=np.float64) * step_deg


def _joseph_csr(nz: int, nx: int, ndet: int, angles_deg: np.ndarray):
    """CSR arrays (indptr, pixel, length in voxels) of Joseph's projector; ray = angle * ndet + bin,
    pixel = x * nz + z. Entries come out grouped by ray, so no sorting is needed."""
    counts, cols, vals = [], [], []
    zc, xc, tc = (nz - 1) / 2, (nx - 1) / 2, (ndet - 1) / 2
    det = np.arange(ndet) - tc
    for th in np.deg2rad(angles_deg):
        s, c = np.sin(th), np.cos(th)
        if abs(c) >= abs(s):  # march along z, interpolate in x
            pos = (det[:, None] + (np.arange(nz) - zc)[None, :] * s) / c + xc
            step, fixed, n_int = 1.0 / abs(c), np.broadcast_to(np.arange(nz)[None, :], pos.shape), nx
        else:  # march along x (only the columns where the ray is inside the slab), interpolate in z
            if abs(c) > 1e-6:
                x_a, x_b = (det + s * (-zc - 1)) / c, (det + s * (zc + 1)) / c
                width = min(nx, int(np.ceil(abs(x_b[0] - x_a[0]))) + 2)
                first = np.floor(np.minimum(x_a, x_b) + xc).astype(np.int64)
            else:
                width, first = nx, np.zeros(ndet, np.int64)
            fixed = np.clip(first[:, None] + np.arange(width)[None, :], 0, nx - 1)
            pos = ((fixed - xc) * c - det[:, None]) / s + zc
            pos = np.where(np.diff(fixed, axis=1, prepend=-1) > 0, pos, -10.0)  # drop clipped repeats
            step, n_int = 1.0 / abs(s), nz
        i0 = np.floor(pos).astype(np.int64)
        frac = pos - i0
        idx = np.concatenate([i0, i0 + 1], axis=1)  # (ndet, 2k): both neighbours, grouped by ray
        w = np.concatenate([1.0 - frac, frac], axis=1)
        fix = np.concatenate([fixed, fixed], axis=1)
        ok = (idx >= 0) & (idx < n_int) & (w > 0)
        pix = idx * nz + fix if abs(c) >= abs(s) else fix * nz + idx
        counts.append(ok.sum(axis=1))
        cols.append(pix[ok])
        vals.append(w[ok] * step)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    return indptr, np.concatenate(cols), np.concatenate(vals).astype(np.float32)


def _torch_csr(indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR is beta" notice
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(np.int32)),
            torch.from_numpy(cols.astype(np.int32)),
            torch.from_numpy(vals.astype(np.float32)),
            size=shape,
        )


@dataclass(frozen=True)
class Projector:
    """Sparse Joseph projector for (nz, nx) planes onto ndet detector bins at each angle."""

    nz: int
    nx: int
    ndet: int
    angles_deg: tuple[float, ...]
    matrix: torch.Tensor  # (n_angles * ndet, nx * nz)
    transpose: torch.Tensor | None  # built only when reconstructing

    def forward(self, volume: np.ndarray) -> np.ndarray:
        """(nz, ny, nx) volume -> (n_angles, ndet, ny) line integrals (voxel units)."""
        nz, ny, nx = volume.shape
        out = np.empty((len(self.angles_deg) * self.ndet, ny), np.float32)
        for y0 in range(0, ny, Y_CHUNK):
            part = volume[:, y0 : y0 + Y_CHUNK, :].transpose(2, 0, 1).reshape(nx * nz, -1)
            x = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
            out[:, y0 : y0 + Y_CHUNK] = (self.matrix @ x).numpy()
        return out.reshape(len(self.angles_deg), self.ndet, ny)


@functools.lru_cache(maxsize=4)
def get_projector(nz: int, nx: int, ndet: int, angles_deg: tuple[float, ...], with_transpose: bool) -> Projector:
    """Build (once per geometry) the projection matrix; cached for the next tomogram."""
    indptr, cols, vals = _joseph_csr(nz, nx, ndet, np.asarray(angles_deg))
    shape = (len(angles_deg) * ndet, nx * nz)
    mat = _torch_csr(indptr, cols, vals, shape)
    tr = None
    if with_transpose:
        import scipy.sparse as sp

        t = sp.csr_matrix((vals, cols, indptr), shape=shape).T.tocsr()
        tr = _torch_csr(t.indptr, t.indices, t.data, shape[::-1])
    return Projector(nz, nx, ndet, tuple(angles_deg), mat, tr)


def sirt(sinogram: np.ndarray, nz: int, angles_deg: np.ndarray, iterations: int, extend: int = 0) -> np.ndarray:
    """SIRT x += C A^T R (b - A x) from zero, C/R = inverse column/row sums (as ASTRA, IMOD).

    sinogram: (n_angles, nx, ny) line integrals in voxel units; returns (nz, ny, nx). The grid is
    `extend` voxels wider than the detector on each side (then cropped), so the slab that tilted
    rays cross outside the field of view has somewhere to go instead of piling up at the edges.
    """
    n_a, nx, ny = sinogram.shape
    wide = nx + 2 * extend
    p = get_projector(nz, wide, nx, tuple(float(a) for a in angles_deg), True)
    row = p.matrix @ torch.ones(wide * nz, 1)
    col = p.transpose @ torch.ones(n_a * nx, 1)
    r_inv = torch.where(row > 1e-6, 1.0 / row.clamp_min(1e-6), torch.zeros_like(row))
    c_inv = torch.where(col > 1e-6, 1.0 / col.clamp_min(1e-6), torch.zeros_like(col))
    out = np.empty((nz, ny, nx), np.float32)
    for y0 in range(0, ny, Y_CHUNK):
        part = sinogram[:, :, y0 : y0 + Y_CHUNK].reshape(n_a * nx, -1)
        b = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
        x = torch.zeros(wide * nz, b.shape[1])
        for _ in range(iterations):
            resid = b - p.matrix @ x
            resid *= r_inv
            upd = p.transpose @ resid
            upd *= c_inv
            x += upd
        vol = x.numpy().reshape(wide, nz, -1)[extend : extend + nx]
        out[:, y0 : y0 + Y_CHUNK, :] = vol.transpose(1, 2, 0)
    return out


def acquire(
    mu: np.ndarray,
    voxel_nm: float,
    angles_deg: np.ndarray,
    ndet: int,
    *,
    psf_fwhm_nm: float,
    dose: float,
    rng: np.random.Generator,
    jitter_px: float = 0.0,
    flux_jitter: float = 0.0,
) -> np.ndarray:
    """Tilt series of a (nz, ny, nx) LAC map (1/um) -> noisy line integrals -log(I/I0), (n_a, ndet, ny).

    Beer-Lambert transmission, Gaussian zone-plate PSF on the detector, per-angle residual
    alignment shifts and flux errors, Poisson counting at `dose` photons/pixel (0 = no noise).
    """
    nz, _, nx = mu.shape
    proj = get_projector(nz, nx, ndet, tuple(float(a) for a in angles_deg), False)
    line = proj.forward(mu) * np.float32(voxel_nm * 1e-3)  # (1/um) * um
    trans = np.exp(-line, out=line)
    sigma = psf_fwhm_nm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / voxel_nm
    if sigma > 0:
        trans = ndimage.gaussian_filter(trans, (0, sigma, sigma), mode="nearest")
    if jitter_px > 0:  # the reconstruction assumes perfect alignment, as after fiducial tracking
        shifts = rng.normal(0.0, jitter_px, size=(len(angles_deg), 2))
        for a in range(len(angles_deg)):
            trans[a] = ndimage.shift(trans[a], shifts[a], order=1, mode="nearest")
    if flux_jitter > 0:
        trans *= (1.0 + rng.normal(0.0, flux_jitter, size=(len(angles_deg), 1, 1))).astype(np.float32)
    if dose > 0:
        counts = rng.poisson(trans * np.float32(dose)).astype(np.float32)
        trans = np.maximum(counts, 0.5, out=counts) / np.float32(dose)
    return -np.log(np.maximum(trans, 1e-6), dtype=np.float32)


def reconstruct(
    line_integrals: np.ndarray,
    nz: int,
    voxel_nm: float,
    angles_deg: np.ndarray,
    iterations: int,
    extend: int | None = None,
) -> np.ndarray:
    """SIRT reconstruction of (n_a, nx, ny) line integrals to a (nz, ny, nx) LAC map in 1/um.

    By default the grid is widened by nz/2 tan(max tilt) + 4 voxels per side: edge artifacts of
    the truncated slab remain in the outer few voxels, as in real reconstructions.
    """
    if extend is None:
        th = np.deg2rad(min(float(np.max(np.abs(angles_deg))), 80.0))
        extend = int(np.ceil(nz / 2 * np.tan(th))) + 4
    rec = sirt(line_integrals, nz, angles_deg, iterations, extend)
    rec /= np.float32(voxel_nm * 1e-3)
    return rec
