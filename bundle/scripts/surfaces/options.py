"""The ``surfaces`` workflow's settings as typed objects, one per part (configs/surfaces.json).

Each is built from config or command-line values and converts them on construction (``"false"``,
``"null"``, ``"ply,stl"``, ``"[20,9.8,9.8]"``) with ``scripts.options``, so the workflow behind them
takes typed values only. :meth:`SurfaceOptions.from_settings` builds the whole set from flat keyword
settings (the Python API and ``python -m scripts.surfaces.workflow``), reading the field names from
the classes below rather than repeating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scripts.options import as_bool, as_choice, as_names, as_optional, as_voxel_size
from scripts.surfaces.meshes import MESH_FORMATS
from scripts.surfaces.morphology import Z_CLOSING_MODES

__all__ = ["MeshOptions", "ObjectOptions", "PictureOptions", "SurfaceOptions"]


@dataclass(frozen=True)
class ObjectOptions:
    """Mask -> objects (``morphology.prepare_objects``); recorded in each summary's ``options``.

    Attributes:
        z_closing: "none", "or" or "closing": joining objects across slices predicted one by one.
        z_radius: slices reached by ``z_closing``.
        connectivity: 1, 2 or 3 (6-, 18- or 26-neighbourhood) for connected components.
        threshold: a soft (probability) mask is foreground above this.
        min_voxels: smaller objects are dropped.
        border_margin: objects within this many voxels of a face are flagged as touching the border.
    """

    z_closing: str = "none"
    z_radius: int = 2
    connectivity: int = 3
    threshold: float = 0.5
    min_voxels: int = 500
    border_margin: int = 0

    def __post_init__(self) -> None:
        closing = self.z_closing if self.z_closing not in (None, False) else "none"
        _set(
            self,
            z_closing=as_choice(closing, "z_closing", Z_CLOSING_MODES),
            z_radius=int(self.z_radius),
            connectivity=int(self.connectivity),
            threshold=float(self.threshold),
            min_voxels=int(self.min_voxels),
            border_margin=int(self.border_margin),
        )


@dataclass(frozen=True)
class MeshOptions:
    """Objects -> surface meshes and their files.

    Attributes:
        smoothing_iterations: Taubin smoothing steps of each marching-cubes surface.
        preserve_volume: rescale each smoothed mesh to its unsmoothed volume.
        formats: mesh files written (any of ply, stl, obj, glb).
        per_object_meshes: also one file per object in ``meshes/``.
    """

    smoothing_iterations: int = 25
    preserve_volume: bool = True
    formats: tuple[str, ...] = MESH_FORMATS
    per_object_meshes: bool = True

    def __post_init__(self) -> None:
        _set(
            self,
            smoothing_iterations=int(self.smoothing_iterations),
            preserve_volume=as_bool(self.preserve_volume, "preserve_volume"),
            formats=tuple(as_names(self.formats, "mesh format", MESH_FORMATS)),
            per_object_meshes=as_bool(self.per_object_meshes, "per_object_meshes"),
        )


@dataclass(frozen=True)
class PictureOptions:
    """The montage and the 3D picture.

    Attributes:
        montage_slices: slices in ``montage.png`` (0: no montage).
        montage_columns: montage columns.
        render_3d: draw ``surfaces_3d.png``.
        render_max_faces: triangles drawn at most (larger scenes are simplified for the picture only).
    """

    montage_slices: int = 12
    montage_columns: int = 4
    render_3d: bool = True
    render_max_faces: int = 60000

    def __post_init__(self) -> None:
        _set(
            self,
            montage_slices=int(self.montage_slices),
            montage_columns=int(self.montage_columns),
            render_3d=as_bool(self.render_3d, "pictures#render_3d"),
            render_max_faces=int(self.render_max_faces),
        )


@dataclass(frozen=True)
class SurfaceOptions:
    """Everything the workflow does to one mask volume.

    Attributes:
        objects, meshes, pictures: the parts above.
        voxel_size_nm: overrides the header (one number or (z, y, x) in nm); None: the header's.
        save_labels: write the label volume the object ids refer to.
    """

    objects: ObjectOptions = field(default_factory=ObjectOptions)
    meshes: MeshOptions = field(default_factory=MeshOptions)
    pictures: PictureOptions = field(default_factory=PictureOptions)
    voxel_size_nm: float | tuple[float, float, float] | None = None
    save_labels: bool = True

    def __post_init__(self) -> None:
        pictures = self.pictures
        if isinstance(pictures, Mapping) or as_optional(pictures) is None:
            pictures = PictureOptions(**dict(pictures or {}))
        _set(
            self,
            pictures=pictures,
            voxel_size_nm=as_voxel_size(self.voxel_size_nm),
            save_labels=as_bool(self.save_labels, "save_labels"),
        )

    @classmethod
    def from_settings(cls, **settings: Any) -> SurfaceOptions:
        """Build from flat settings named as the fields of the parts (``min_voxels=20``, ``formats``,
        ``pictures={...}``...); a name that is no field raises TypeError."""
        parts: dict[str, Any] = {}
        for name, part in (("objects", ObjectOptions), ("meshes", MeshOptions)):
            names = {f.name for f in dataclasses.fields(part)}
            parts[name] = part(**{k: settings.pop(k) for k in list(settings) if k in names})
        return cls(**parts, **settings)


def _set(obj: object, **values: Any) -> None:
    # The classes are frozen (settings do not change during a run); their own checks set converted values.
    for name, value in values.items():
        object.__setattr__(obj, name, value)
