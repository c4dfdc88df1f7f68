"""Surfaces of binary objects: marching cubes in nanometres, volume-keeping smoothing, export.

Coordinates of every mesh are in nanometres, in (x, y, z) order (what 3D viewers expect), with the
centre of voxel (z, y, x) = (0, 0, 0) at the origin: voxel (k, j, i) is at (i*sx, j*sy, k*sz).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import trimesh
from scipy import sparse
from scripts.io.atomic import atomic_output
from skimage.measure import marching_cubes

__all__ = [
    "MESH_FORMATS",
    "export_mesh",
    "export_scene",
    "load_mesh",
    "mask_surface",
    "object_surface",
    "restore_volume",
    "smooth_mesh",
    "taubin",
    "vertex_normals",
    "volume_area",
]

logger = logging.getLogger(__name__)

MESH_FORMATS = ("ply", "stl", "obj", "glb")
MC_SLAB = 128  # z slices per marching-cubes call; bounds the float32 temporary for large objects
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = 0.53  # Taubin's pass-band k = 1/lambda - 1/mu = 0.113
# Below these fractions an object is too small or too thin for a surface (see object_surface).
MIN_MC_FILL = 0.5  # marching-cubes volume / voxel volume
MIN_SMOOTH_KEEP = 0.1  # smoothed volume / marching-cubes volume


def mask_surface(
    mask: np.ndarray, spacing_zyx: Sequence[float], origin_zyx: Sequence[int] = (0, 0, 0), slab: int = MC_SLAB
) -> trimesh.Trimesh:
    """Closed iso-surface (level 0.5, Lewiner marching cubes) of a boolean array.

    ``mask`` must have an empty one-voxel frame on all six sides (see ``morphology`` /
    ``padded_crop``) so that the surface is closed. ``origin_zyx`` is the voxel index of
    ``mask[0, 0, 0]`` in the full volume. The array is processed in slabs of ``slab`` z-slices
    (one slice of overlap), so only a slab is ever converted to float32. On a 0/1 volume every
    marching-cubes vertex lies at the middle of a voxel edge, so vertices are merged exactly on a
    half-voxel integer grid and the slabs join without seams. Returns a watertight mesh with
    outward normals, vertices in nm (x, y, z); empty mesh if the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    nz, ny, nx = mask.shape
    keys_list, faces_list = [], []
    n_vertices = 0
    for z0 in range(0, max(nz - 1, 0), slab):
        sub = mask[z0 : min(nz, z0 + slab + 1)]
        if sub.shape[0] < 2 or not sub.any():
            continue
        verts, faces, _, _ = marching_cubes(sub.astype(np.float32), 0.5, method="lewiner")
        keys = np.rint(verts.astype(np.float64) * 2.0).astype(np.int64)  # half-voxel units
        keys[:, 0] += 2 * z0
        keys_list.append(keys)
        faces_list.append(faces.astype(np.int64) + n_vertices)
        n_vertices += len(keys)
    if not keys_list:
        return trimesh.Trimesh()
    keys = np.concatenate(keys_list)
    faces = np.concatenate(faces_list)
    wy, wx = 2 * ny + 1, 2 * nx + 1
    packed = (keys[:, 0] * wy + keys[:, 1]) * wx + keys[:, 2]
    unique, inverse = np.unique(packed, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    kz, rest = np.divmod(unique, wy * wx)
    ky, kx = np.divmod(rest, wx)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    origin = np.asarray(origin_zyx, dtype=np.float64)
    zyx = (np.stack([kz, ky, kx], axis=1) / 2.0 + origin) * spacing
    # (z, y, x) -> (x, y, z) is an odd permutation: the winding flips with it, checked below.
    xyz = zyx[:, ::-1].copy()
    if volume_area(xyz, faces)[0] < 0:
        faces = faces[:, ::-1].copy()
    return trimesh.Trimesh(vertices=xyz, faces=faces, process=False)


def volume_area(vertices: np.ndarray, faces: np.ndarray) -> tuple[float, float]:
    """Enclosed (signed) volume and surface area of a closed triangle mesh."""
    if len(faces) == 0:
        return 0.0, 0.0
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    cross = np.cross(v1 - v0, v2 - v0)
    volume = float(np.einsum("ij,ij->", v0, cross)) / 6.0
    area = float(np.sqrt(np.einsum("ij,ij->i", cross, cross)).sum()) / 2.0
    return volume, area


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals, the area-weighted mean of the normals of the faces around a vertex."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    cross = np.cross(v1 - v0, v2 - v0)  # length = 2 * face area
    n = np.zeros_like(vertices)
    for k in range(3):
        for d in range(3):
            n[:, d] += np.bincount(faces[:, k], weights=cross[:, d], minlength=len(vertices))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def umbrella_operator(faces: np.ndarray, n_vertices: int) -> sparse.csr_matrix:
    """Row-normalised vertex adjacency (each vertex -> mean of its edge neighbours)."""
    rows = faces[:, [0, 1, 2, 1, 2, 0]].ravel()
    cols = faces[:, [1, 2, 0, 0, 1, 2]].ravel()
    adj = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, n_vertices))
    adj.sum_duplicates()
    adj.data[:] = 1.0
    degree = np.asarray(adj.sum(axis=1)).ravel()
    return sparse.diags(1.0 / np.where(degree > 0, degree, 1.0)) @ adj


def taubin(
    vertices: np.ndarray,
    faces: np.ndarray,
    iterations: int,
    lamb: float = TAUBIN_LAMBDA,
    mu: float = TAUBIN_MU,
) -> np.ndarray:
    """Taubin lambda|mu smoothing: ``iterations`` pairs of a shrinking step (+lambda * Laplacian)
    and an inflating step (-mu * Laplacian) with the umbrella Laplacian; returns new vertices.
    (The same filter as ``trimesh.smoothing.filter_taubin(..., iterations=2 * iterations)``.)"""
    op = umbrella_operator(faces, len(vertices))
    v = np.array(vertices, dtype=np.float64, copy=True)
    for _ in range(int(iterations)):
        v += lamb * (op @ v - v)
        v -= mu * (op @ v - v)
    return v


def restore_volume(vertices: np.ndarray, faces: np.ndarray, target_volume: float, steps: int = 8) -> np.ndarray:
    """Move every vertex along its normal by the same distance so the enclosed volume is the target.

    A uniform normal offset ``d`` changes the volume by ``area * d`` to first order; a few Newton
    steps make it exact. Returns new vertices.
    """
    v = np.array(vertices, dtype=np.float64, copy=True)
    for _ in range(steps):
        volume, area = volume_area(v, faces)
        if area <= 0:
            break
        d = (target_volume - volume) / area
        if abs(d) < 1e-9 * max(1.0, abs(target_volume) ** (1 / 3)):
            break
        v += d * vertex_normals(v, faces)
    return v


def smooth_mesh(mesh: trimesh.Trimesh, iterations: int, target_volume: float | None = None) -> trimesh.Trimesh:
    """Taubin lambda|mu smoothing (``iterations`` pairs), then optional volume restoration.

    Marching cubes on a voxelised object follows the voxel staircase, which inflates the surface
    area by 7-13 % (depending on spacing); Taubin's low-pass filter (lambda 0.5, mu 0.53) removes the
    staircase without the shrinking of plain Laplacian smoothing. It still changes the volume by a
    fraction of a percent, so with ``target_volume`` (the voxel-count volume, an unbiased estimate
    of the object's volume) the surface is then offset along its normals to enclose exactly that.
    Returns a new mesh.
    """
    v, f = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces)
    if len(f) == 0:
        return mesh
    if iterations > 0:
        v = taubin(v, f, iterations)
    if target_volume is not None:
        v = restore_volume(v, f, float(target_volume))
    return trimesh.Trimesh(vertices=v, faces=f, process=False)


def object_surface(
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    origin_zyx: Sequence[int] = (0, 0, 0),
    smoothing_iterations: int = 25,
    preserve_volume: bool = True,
) -> tuple[trimesh.Trimesh, dict]:
    """Surface of one object (framed crop, see :func:`mask_surface`), smoothed.

    Returns the mesh and ``{"volume", "area"}`` of the raw (unsmoothed) marching-cubes mesh in nm^3
    and nm^2, with ``"degenerate"``: True when the object is too small or too thin for a surface to
    measure it. Then the mesh returned is the raw marching-cubes one, unsmoothed. Two cases:

    - marching cubes encloses less than ``MIN_MC_FILL`` of the voxel volume: the surface is all cut
      corners (a single voxel is an octahedron of 1/6 its volume; filaments one voxel across, voxels
      touching only at edges or corners);
    - Taubin smoothing keeps less than ``MIN_SMOOTH_KEEP`` of the marching-cubes volume. An object
      one or two voxels across has no shape below the filter's pass-band, so every pass shrinks it
      (by (1 - lambda)(1 + mu) = 0.77 in size for a voxel): 25 passes leave a speck of 1e-9 of its
      volume, and restoring the volume from there divides by that speck's area, which gave volumes
      of 1e19 nm^3. Such a mesh is never restored.
    """
    mesh = mask_surface(mask, spacing_zyx, origin_zyx)
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    volume, area = volume_area(vertices, faces)
    voxel_volume = float(np.count_nonzero(mask)) * float(np.prod(spacing_zyx))
    raw = {"volume": volume, "area": area, "degenerate": volume < MIN_MC_FILL * voxel_volume}
    if raw["degenerate"] or smoothing_iterations <= 0 or len(faces) == 0:
        return mesh, raw
    smoothed = taubin(vertices, faces, smoothing_iterations)
    if volume_area(smoothed, faces)[0] < MIN_SMOOTH_KEEP * volume:
        raw["degenerate"] = True
        return mesh, raw
    if preserve_volume:
        smoothed = restore_volume(smoothed, faces, voxel_volume)
        if not abs(volume_area(smoothed, faces)[0] - voxel_volume) <= 0.01 * voxel_volume:
            raw["degenerate"] = True  # the offset did not converge: the smoothed shape is not the object's
            return mesh, raw
    return trimesh.Trimesh(vertices=smoothed, faces=faces, process=False), raw


def _rgba(color) -> np.ndarray:
    c = np.asarray(color if color is not None else (0.8, 0.8, 0.8), dtype=np.float64).reshape(-1)
    if c.max() <= 1.0:
        c = c * 255.0
    if c.size == 3:
        c = np.append(c, 255.0)
    return np.clip(np.rint(c), 0, 255).astype(np.uint8)


def _material_mesh(mesh: trimesh.Trimesh, color) -> trimesh.Trimesh:
    m = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    material = trimesh.visual.material.PBRMaterial(
        baseColorFactor=_rgba(color), metallicFactor=0.0, roughnessFactor=0.7
    )
    m.visual = trimesh.visual.TextureVisuals(material=material)
    return m


_CHUNK = 1 << 20  # rows formatted or packed at a time by the writers


def _fixed(values: np.ndarray, decimals: int) -> np.ndarray:
    """Decimal text of numbers as a (n, width) uint8 array, right-aligned (space-padded), vectorised.

    ``np.savetxt`` and trimesh format number by number in Python, which takes minutes for the
    tens of millions of numbers of a whole-cell membrane; this builds the characters with array
    arithmetic instead.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    scale = 10**decimals
    q = np.rint(np.abs(v) * scale).astype(np.int64)
    neg = (v < 0) & (q > 0)
    ip, fp = np.divmod(q, scale)
    n_int = np.ones(len(v), dtype=np.int64)
    p = 10
    while len(v) and p <= ip.max():
        n_int += ip >= p
        p *= 10
    width_int = int(n_int.max()) if len(v) else 1
    width = 1 + width_int + (1 + decimals if decimals else 0)
    out = np.full((len(v), width), ord(" "), dtype=np.uint8)
    x = ip.copy()
    for k in range(width_int):
        col = width_int - k
        show = k < n_int
        out[show, col] = ord("0") + (x[show] % 10)
        x //= 10
    if decimals:
        out[:, width_int + 1] = ord(".")
        x = fp.copy()
        for k in range(decimals):
            out[:, width - 1 - k] = ord("0") + x % 10
            x //= 10
    rows = np.flatnonzero(neg)
    out[rows, width_int - n_int[rows]] = ord("-")
    return out


def _text_rows(prefix: bytes, columns: Sequence[np.ndarray]) -> bytes:
    """Lines ``prefix col0 col1 ...`` from (n, w_i) uint8 character columns."""
    n = len(columns[0])
    parts = [np.broadcast_to(np.frombuffer(prefix, dtype=np.uint8), (n, len(prefix)))]
    for c in columns:
        parts += [np.full((n, 1), ord(" "), dtype=np.uint8), c]
    parts.append(np.full((n, 1), ord("\n"), dtype=np.uint8))
    return np.concatenate(parts, axis=1).tobytes()


def _write_obj(f, parts) -> None:
    f.write(b"# cryo-SXT membrane surfaces; coordinates in nm (x, y, z)\n")
    offset = 1
    for name, mesh, color in parts:
        v, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces, dtype=np.int64)
        f.write(f"o {name}\n".encode())
        rgb = _rgba(color)[:3] / 255.0
        for s in range(0, len(v), _CHUNK):
            cols = [_fixed(v[s : s + _CHUNK, d], 3) for d in range(3)]
            cols += [np.broadcast_to(_fixed(np.array([c]), 4), (len(cols[0]), 7)) for c in rgb]
            f.write(_text_rows(b"v", cols))
        for s in range(0, len(faces), _CHUNK):
            fc = faces[s : s + _CHUNK] + offset
            f.write(_text_rows(b"f", [_fixed(fc[:, d], 0) for d in range(3)]))
        offset += len(v)


def _write_ply(f, parts) -> None:
    n_v = sum(len(m.vertices) for _, m, _ in parts)
    n_f = sum(len(m.faces) for _, m, _ in parts)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment cryo-SXT membrane surfaces, units nm\n"
        f"element vertex {n_v}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {n_f}\nproperty list uchar int vertex_indices\n"
        "end_header\n"
    )
    f.write(header.encode("ascii"))
    vdtype = [("xyz", "<f4", (3,)), ("rgba", "u1", (4,))]
    for _, mesh, color in parts:
        v = np.asarray(mesh.vertices)
        for s in range(0, len(v), _CHUNK):
            rec = np.empty(len(v[s : s + _CHUNK]), dtype=vdtype)
            rec["xyz"] = v[s : s + _CHUNK]
            rec["rgba"] = _rgba(color)
            f.write(rec.tobytes())
    fdtype = [("n", "u1"), ("idx", "<i4", (3,))]
    offset = 0
    for _, mesh, _ in parts:
        faces = np.asarray(mesh.faces, dtype=np.int64)
        for s in range(0, len(faces), _CHUNK):
            rec = np.empty(len(faces[s : s + _CHUNK]), dtype=fdtype)
            rec["n"] = 3
            rec["idx"] = faces[s : s + _CHUNK] + offset
            f.write(rec.tobytes())
        offset += len(mesh.vertices)


def _write_stl(f, parts) -> None:
    n_f = sum(len(m.faces) for _, m, _ in parts)
    f.write(b"binary STL: cryo-SXT membrane surfaces, units nm".ljust(80, b" "))
    f.write(np.uint32(n_f).tobytes())
    rdtype = [("normal", "<f4", (3,)), ("v", "<f4", (3, 3)), ("attr", "<u2")]
    for _, mesh, _ in parts:
        v, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
        for s in range(0, len(faces), _CHUNK):
            tri = v[faces[s : s + _CHUNK]]
            nrm = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-30)
            rec = np.zeros(len(tri), dtype=rdtype)
            rec["normal"], rec["v"] = nrm, tri
            f.write(rec.tobytes())


def export_scene(parts: Sequence[tuple[str, trimesh.Trimesh, object]], path: str | Path) -> Path:
    """Write named, coloured meshes ``[(name, mesh, rgb), ...]`` to one file, format from the suffix.

    GLB: one node per part with a PBR material of its colour (separate objects in Blender and web
    viewers). OBJ: one named object (``o``) per part with per-vertex colours. PLY (binary): one
    mesh with per-vertex colours. STL (binary): one mesh, no colour (STL has none). Coordinates in
    nm. Written atomically.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {fmt!r} (choose from {MESH_FORMATS})")
    with atomic_output(path) as tmp:
        if fmt == "glb":
            scene = trimesh.Scene()
            for name, mesh, color in parts:
                scene.add_geometry(_material_mesh(mesh, color), node_name=name, geom_name=name)
            Path(tmp).write_bytes(scene.export(file_type="glb"))
        else:
            with open(tmp, "wb") as f:
                {"obj": _write_obj, "ply": _write_ply, "stl": _write_stl}[fmt](f, parts)
    return path


def export_mesh(mesh: trimesh.Trimesh, path: str | Path, color=None, name: str = "object") -> Path:
    """Write one mesh (format from the suffix), coloured where the format allows; atomic."""
    return export_scene([(name, mesh, color)], path)


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a mesh file written here back as one Trimesh (vertices merged; GLB/OBJ parts joined)."""
    path = Path(path)
    loaded = trimesh.load(io.BytesIO(path.read_bytes()), file_type=path.suffix.lower().lstrip("."))
    if isinstance(loaded, trimesh.Scene):
        geoms = list(loaded.geometry.values())
        return trimesh.util.concatenate(geoms) if len(geoms) > 1 else geoms[0]
    return loaded
