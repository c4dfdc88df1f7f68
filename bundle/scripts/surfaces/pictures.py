"""Pictures for people: a slice montage with the objects overlaid, and a 3D view of the surfaces.

Headless: matplotlib ``Figure`` objects drawn by the Agg renderer, without pyplot (no display, no
OpenGL, no global backend switch). Colours are per object id and the same
in both pictures; objects that touch the volume border are drawn in grey (they are excluded from
the summary statistics).
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from scipy import ndimage
from scripts.io.atomic import atomic_output
from skimage.segmentation import find_boundaries

__all__ = ["BORDER_COLOR", "decimate", "montage", "object_colors", "render_surfaces"]

logger = logging.getLogger(__name__)

BORDER_COLOR = (0.6, 0.6, 0.6)
_GOLDEN = 0.618033988749895


def object_colors(ids: Sequence[int], touches_border: Sequence[bool] | None = None) -> dict[int, tuple]:
    """A distinct, stable RGB colour (0-1 floats) per object id; grey for border objects."""
    touches_border = touches_border if touches_border is not None else [False] * len(ids)
    colors = {}
    for i, border in zip(ids, touches_border, strict=True):
        if border:
            colors[int(i)] = BORDER_COLOR
        else:  # golden-ratio hue steps: neighbouring ids get very different hues
            h = (0.08 + int(i) * _GOLDEN) % 1.0
            s = 0.75 if int(i) % 2 else 0.55
            colors[int(i)] = colorsys.hsv_to_rgb(h, s, 0.95)
    return colors


def _nice_length(target_nm: float) -> float:
    """1, 2 or 5 times a power of ten, not above ``target_nm``."""
    if target_nm <= 0:
        return 0.0
    p = 10 ** math.floor(math.log10(target_nm))
    return max(m * p for m in (1, 2, 5) if m * p <= target_nm)


def _length_label(nm: float) -> str:
    return f"{nm / 1000:g} \u00b5m" if nm >= 1000 else f"{nm:g} nm"


def _figure(**kwargs) -> Figure:
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor=fig.get_facecolor())
    return path


def _overlay(lab: np.ndarray, colors: dict[int, tuple], fill_alpha: float) -> np.ndarray:
    """RGBA image of a label slice: filled objects plus opaque outlines; background transparent."""
    ids, inverse = np.unique(lab, return_inverse=True)
    lut = np.zeros((len(ids), 4), dtype=np.float32)
    for k, i in enumerate(ids):
        if i != 0:
            lut[k, :3] = colors.get(int(i), (1.0, 1.0, 0.0))
            lut[k, 3] = fill_alpha
    rgba = lut[inverse.reshape(lab.shape)]
    edges = find_boundaries(lab, mode="inner") & (lab != 0)
    rgba[edges, 3] = 1.0
    return rgba


def _label_ids(ax, lab: np.ndarray, sy: float, sx: float, max_labels: int) -> None:
    """Write each object's id at the centre of its largest part in the slice (table row lookup)."""
    ids = np.unique(lab)
    ids = ids[ids != 0]
    if ids.size == 0 or ids.size > max_labels:
        return
    centres = ndimage.center_of_mass(np.ones(lab.shape, dtype=np.uint8), lab, ids)
    for i, (cy, cx) in zip(ids, centres, strict=True):
        if lab[int(round(cy)), int(round(cx))] != i:  # centre outside the object (a ring): use a voxel of it
            cy, cx = np.argwhere(lab == i)[0]
        ax.text(
            cx * sx,
            cy * sy,
            str(int(i)),
            color="white",
            fontsize=7,
            ha="center",
            va="center",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.55, "edgecolor": "none"},
        )


def montage(
    labels: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
    image: np.ndarray | None = None,
    colors: dict[int, tuple] | None = None,
    n_slices: int = 12,
    ncols: int = 4,
    title: str = "",
    panel_inches: float = 3.6,
    max_labels: int = 40,
    dpi: int = 110,
) -> Path:
    """PNG of ``n_slices`` evenly spaced z slices with the labelled objects in colour.

    With ``image`` (the tomogram, same shape) each slice is shown in grey (0.5-99.5 percentile
    contrast over the shown slices) under semi-transparent object colours with opaque outlines;
    without it the objects are drawn on black. Each panel has its z index and depth in nm; the
    first panel has a scale bar in nm / um. Object ids (as in the table) are written on the
    objects when a slice has at most ``max_labels`` of them.
    """
    nz, ny, nx = labels.shape
    n = max(1, min(int(n_slices), nz))
    zs = sorted({min(nz - 1, int((k + 0.5) * nz / n)) for k in range(n)})
    ncols = max(1, min(int(ncols), len(zs)))
    nrows = math.ceil(len(zs) / ncols)
    sz, sy, sx = (float(s) for s in spacing)
    aspect = (ny * sy) / (nx * sx)
    fig = _figure(
        figsize=(panel_inches * ncols, (panel_inches * aspect + 0.3) * nrows + 0.5),
        facecolor="white",
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = colors or {}
    if image is not None:
        sample = np.stack(
            [np.asarray(image[z], dtype=np.float32)[:: max(1, ny // 256), :: max(1, nx // 256)] for z in zs]
        )
        lo, hi = np.percentile(sample, [0.5, 99.5])
        hi = hi if hi > lo else lo + 1.0
    extent = (-0.5 * sx, (nx - 0.5) * sx, (ny - 0.5) * sy, -0.5 * sy)  # nm, image orientation
    for ax in axes.ravel():
        ax.axis("off")
    for k, z in enumerate(zs):
        ax = axes.ravel()[k]
        lab = np.asarray(labels[z])
        if image is not None:
            ax.imshow(
                np.asarray(image[z], dtype=np.float32),
                cmap="gray",
                vmin=lo,
                vmax=hi,
                extent=extent,
                interpolation="antialiased",
            )
            ax.imshow(_overlay(lab, colors, 0.4), extent=extent, interpolation="nearest")
        else:
            ax.imshow(np.zeros((1, 1)), cmap="gray", vmin=0, vmax=1, extent=extent)
            ax.imshow(_overlay(lab, colors, 0.85), extent=extent, interpolation="nearest")
        ax.set_title(f"z = {z}  ({z * sz:.0f} nm)", fontsize=9)
        _label_ids(ax, lab, sy, sx, max_labels)
        if k == 0:
            bar = _nice_length(0.25 * nx * sx)
            if bar > 0:
                scalebar = AnchoredSizeBar(
                    ax.transData,
                    bar,
                    _length_label(bar),
                    "lower right",
                    pad=0.3,
                    sep=3,
                    color="white",
                    frameon=True,
                    size_vertical=max(sy, 0.012 * ny * sy),
                    fontproperties={"size": 8},
                )
                scalebar.patch.set(facecolor="black", alpha=0.6, edgecolor="none")
                ax.add_artist(scalebar)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def decimate(vertices: np.ndarray, faces: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustering simplification (for display only): vertices in one cubic cell of side
    ``cell`` are merged into their mean; collapsed and duplicate triangles are dropped."""
    if cell <= 0 or len(faces) == 0:
        return vertices, faces
    keys = np.floor(vertices / cell).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    new_v = np.stack([np.bincount(inverse, weights=vertices[:, d], minlength=len(counts)) for d in range(3)], 1)
    new_v /= counts[:, None]
    f = inverse[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    if len(f):
        _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
        f = f[np.sort(first)]
    return new_v, f


def _shade(normals: np.ndarray, color, light=(0.35, -0.45, 0.82), alpha: float = 1.0) -> np.ndarray:
    light = np.asarray(light) / np.linalg.norm(light)
    lam = np.abs(normals @ light)  # two-sided: triangles seen from behind are lit too
    rgb = np.clip(np.asarray(color)[None, :3] * (0.35 + 0.65 * lam[:, None]), 0, 1)
    return np.concatenate([rgb, np.full((len(rgb), 1), alpha)], axis=1)


def _enclosing(bounds: Sequence[np.ndarray]) -> np.ndarray:
    """For boxes ``[[lo], [hi]]``: whether each box holds the centre of a smaller box."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 2, 3)
    lo, hi = b[:, 0], b[:, 1]
    centre = (lo + hi) / 2
    size = np.prod(np.maximum(hi - lo, 1e-9), axis=1)
    out = np.zeros(len(b), dtype=bool)
    for i in range(len(b)):
        inside = np.all((centre >= lo[i]) & (centre <= hi[i]), axis=1) & (size < size[i])
        out[i] = inside.any()
    return out


def render_surfaces(
    parts: Sequence[tuple[str, object, tuple]],
    path: str | Path,
    title: str = "",
    max_faces: int = 60000,
    dpi: int = 110,
) -> Path | None:
    """PNG with two views (oblique and top, as in the montage) of coloured surfaces.

    ``parts`` is ``[(name, trimesh mesh with nm (x, y, z) vertices, rgb)]``. Meshes with more than
    ``max_faces`` faces in total are simplified for the picture only (vertex clustering; the
    exported meshes and measurements are unaffected). Objects that enclose others (a cell or
    nuclear envelope: their box holds the centre of a smaller object's box) are drawn
    translucent so that what is inside stays visible. Returns None when there is nothing to draw.
    """
    parts = [p for p in parts if p[1] is not None and len(p[1].faces)]
    if not parts:
        return None
    enclosing = _enclosing([np.asarray(m.bounds) for _, m, _ in parts])
    total_faces = sum(len(m.faces) for _, m, _ in parts)
    total_area = sum(float(m.area) for _, m, _ in parts)
    cell = math.sqrt(3.0 * total_area / max_faces) if total_faces > max_faces else 0.0
    tris, cols = [], []
    for (_, mesh, color), translucent in zip(parts, enclosing, strict=True):
        v, f = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces)
        if cell > 0:
            extent = float(np.ptp(v, axis=0).max())
            v, f = decimate(v, f, min(cell, extent / 3.0))
            if len(f) == 0:
                continue
        t = v[f] / 1000.0  # um
        nrm = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
        tris.append(t)
        cols.append(_shade(nrm, color, alpha=0.3 if translucent else 1.0))
    if not tris:
        return None
    tris = np.concatenate(tris)
    cols = np.concatenate(cols)
    lo, hi = tris.reshape(-1, 3).min(0), tris.reshape(-1, 3).max(0)
    span = np.maximum(hi - lo, 1e-3)
    fig = _figure(figsize=(13, 6.2), facecolor="white")
    views = (("oblique view", 28, -58, False), ("top view (as the slices)", 90, -90, True))
    for k, (name, elev, azim, top) in enumerate(views):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        ax.add_collection3d(Poly3DCollection(tris, facecolors=cols, edgecolors="none", linewidths=0))
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1]) if top else ax.set_ylim(lo[1], hi[1])  # top view: y down like an image
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(tuple(span))
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("x (\u00b5m)", fontsize=8)
        ax.set_ylabel("y (\u00b5m)", fontsize=8)
        if not top:
            ax.set_zlabel("z (\u00b5m)", fontsize=8)
        else:
            ax.set_zticks([])
        ax.tick_params(labelsize=7)
        ax.set_title(name, fontsize=9)
    shown = len(tris)
    n_grey = sum(1 for _, _, c in parts if tuple(c) == BORDER_COLOR)
    note = f"{len(parts)} objects ({n_grey} touching the volume border, grey), {shown:,} triangles shown"
    if cell > 0:
        note += f" (simplified from {total_faces:,} for display)"
    if enclosing.any():
        note += f"; {int(enclosing.sum())} enclosing object(s) translucent"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)
