"""OME-Zarr (OME-NGFF 0.4) image folders in and out: a reader that streams slices, and a chunked Sink.

Library: zarr-python 2 (``zarr>=2.18.3,<3``). zarr 3 needs Python >= 3.11 and the bundle supports 3.10
(the MONAI model zoo's premerge runs it); zarr 2 reads and writes the Zarr v2 format of OME-NGFF 0.4,
the version the CryoET Data Portal and copick serve. NGFF 0.5 stores (Zarr v3 format) are refused with
a message. Not ``ome-zarr``: it brings dask and reads whole levels as dask arrays, while all we need from
the spec are a few keys of JSON metadata, and the writer must go slice block by slice block through
our own Sink (scripts.io.sinks) so that memory stays flat.

Only the chunks an index touches are read (``volume.data[z]`` reads the chunks of slice z), so a store
is never loaded whole; a chunk that cannot be decoded raises a VolumeError naming the store.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from scripts.io.volume import VolumeError, VoxelSize, _clean_voxel, _round_sig, _unit_to_nm, _warn_missing

__all__ = ["CHUNK_SIDE", "OmeZarrSink", "ZarrStack", "read_omezarr", "zarr_bytes_to_write"]

CHUNK_SIDE = 1024  # chunks are (1, <= 1024, <= 1024): one slice block never rewrites a chunk
_VERSION = "0.4"
_SPATIAL_NAMES = ("z", "y", "x")
# zstd with bit shuffling: a mask of thin contours (0/1 bytes) shrank 30x, a smooth float16 map 10x;
# Blosc's own header is its per-chunk overhead (16 bytes), counted in the disk-space estimate.
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
_BLOCK = 4096  # a chunk file takes at least one file-system block


class _CheckedStore(zarr.storage.DirectoryStore):
    """A directory store that refuses Blosc chunks whose size differs from what their header says.

    Blosc stores incompressible data (random-looking uint8, say) as a plain copy, and numcodecs then
    decodes a truncated chunk of it without any error, from memory past its end. Zarr has no such
    check, hence this one: a Blosc frame records its own length (bytes 12-15, little endian).
    """

    _BLOSC_HEADER = 16

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._blosc_arrays: dict[str, bool | None] = {}  # None: not an array folder

    def _is_blosc(self, key: str) -> bool:
        # The array a chunk key belongs to: the nearest folder above it that holds a .zarray.
        parts = key.split("/")[:-1]
        while parts:
            prefix = "/".join(parts)
            if prefix not in self._blosc_arrays:
                try:
                    meta = json.loads(super().__getitem__(prefix + "/.zarray"))
                except (KeyError, ValueError):
                    self._blosc_arrays[prefix] = None
                else:
                    self._blosc_arrays[prefix] = (meta.get("compressor") or {}).get("id") == "blosc"
            if self._blosc_arrays[prefix] is not None:
                return self._blosc_arrays[prefix]
            parts.pop()
        return False

    def __getitem__(self, key: str) -> bytes:
        value = super().__getitem__(key)
        name = key.rsplit("/", 1)[-1]
        if not name.startswith(".") and self._is_blosc(key):
            if len(value) < self._BLOSC_HEADER:
                raise ValueError(f"chunk {key} has {len(value)} bytes, shorter than a Blosc header")
            expected = int.from_bytes(value[12:16], "little")
            if expected != len(value):
                raise ValueError(f"chunk {key} has {len(value)} bytes, its Blosc header says {expected}")
        return value


class ZarrStack:
    """A (z, y, x) view of one level of an OME-Zarr image; indexing reads only the chunks it touches.

    Leading time/channel axes of size 1 are fixed at 0. Has what the bundle uses of an array
    (``shape``, ``dtype``, ``ndim``, ``nbytes``, indexing, ``np.asarray``); a page release
    (``scripts.io.pages.release_pages``) of what it returns is a no-op, as for any in-memory array.
    """

    ndim = 3

    def __init__(self, array: zarr.Array, lead: int, path: Path) -> None:
        self._array = array
        self._lead = (0,) * lead
        self.path = path
        self.shape: tuple[int, int, int] = tuple(int(n) for n in array.shape[lead:])  # type: ignore[assignment]
        self.dtype = np.dtype(array.dtype)
        self.chunks: tuple[int, ...] = tuple(int(n) for n in array.chunks[lead:])

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        try:
            return self._array[self._lead + key]
        except IndexError:  # the caller's index, not the store
            raise
        except Exception as err:  # numcodecs/zarr raise RuntimeError, ValueError, zlib.error...
            raise VolumeError(
                f"{self.path}: cannot read {_where(key[0])} ({type(err).__name__}: {err}); a chunk of the "
                "store is truncated or corrupt"
            ) from err

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"ZarrStack({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunks})"


def _where(first: Any) -> str:
    if isinstance(first, (int, np.integer)):
        return f"slice z={int(first)}"
    if isinstance(first, slice) and first.start is not None and first.stop is not None:
        return f"slices z={first.start}..{first.stop - 1}"
    return "the data"


# ----------------------------------------------------------------------------- reading


def read_omezarr(path: Path, level: int = 0) -> tuple[ZarrStack | np.ndarray, VoxelSize | None, tuple | None]:
    """(data, voxel size in nm (z, y, x), origin in Angstrom (x, y, z)) of level ``level`` of ``path``.

    A 2D image is read whole (it is one slice) and returned as a (y, x) array; 3D data as a
    :class:`ZarrStack`. VolumeError naming ``path`` for anything that is not an OME-NGFF image.
    """
    group, attrs = _open_group(path)
    image = _multiscale(attrs, path)
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise VolumeError(f"{path}: OME-Zarr 'multiscales' metadata lists no datasets (resolution levels)")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(datasets):
        last = len(datasets) - 1
        raise VolumeError(f"{path}: level {level!r} does not exist; this store has levels 0 to {last}")
    dataset = datasets[int(level)]
    array = _level_array(group, dataset, level, path)
    names, kinds, units = _axes(image, array.ndim, path)
    spatial = [i for i, kind in enumerate(kinds) if kind == "space"]
    lead = array.ndim - len(spatial)
    if spatial != list(range(lead, array.ndim)) or len(spatial) not in (2, 3):
        raise VolumeError(
            f"{path}: OME-Zarr axes {''.join(names)} of shape {tuple(array.shape)}; expected "
            "2 or 3 space axes after any time/channel axes"
        )
    extra = [f"{names[i]}={array.shape[i]}" for i in range(lead) if array.shape[i] > 1]
    if extra:
        raise VolumeError(
            f"{path}: OME-Zarr image with axes {''.join(names)} and shape {tuple(array.shape)} "
            f"has {', '.join(extra)}; expected one 3D stack (z, y, x): keep a single "
            "channel and time point"
        )
    if len(spatial) == 3 and tuple(names[lead:]) != _SPATIAL_NAMES:
        warnings.warn(
            f"{path}: OME-Zarr space axes are {''.join(names[lead:])}; used as (z, y, x) as stored", stacklevel=3
        )
    scale, shift = _transforms(image, dataset, array.ndim, path)
    vox, origin = _physical(scale, shift, units, lead, path)
    stack = ZarrStack(array, lead, path)
    if len(spatial) == 2:  # one image: small, read whole; the caller refuses it unless it allows 2D
        return stack[...], vox, origin
    return stack, vox, origin


def _open_group(path: Path) -> tuple[zarr.Group, dict]:
    if (path / "zarr.json").is_file() and not (path / ".zgroup").is_file():
        raise VolumeError(
            f"{path}: a Zarr v3 store (OME-NGFF 0.5); this bundle reads OME-NGFF 0.4 (Zarr v2) "
            "stores: save it as OME-NGFF 0.4"
        )
    if (path / ".zarray").is_file():
        raise VolumeError(
            f"{path}: a bare Zarr array without OME-NGFF metadata; an OME-Zarr image (a group "
            "with 'multiscales' in .zattrs) was expected"
        )
    if not (path / ".zgroup").is_file():
        raise VolumeError(f"{path}: no .zgroup; not a Zarr store (an OME-Zarr image folder was expected)")
    try:
        group = zarr.open_group(_CheckedStore(str(path)), mode="r")
        return group, group.attrs.asdict()
    except Exception as err:  # bad JSON in .zgroup/.zattrs and the like
        why = f"{type(err).__name__}: {err}"
        raise VolumeError(f"{path}: cannot read its Zarr metadata (.zgroup, .zattrs) ({why})") from err


def _multiscale(attrs: dict, path: Path) -> dict:
    # 0.4 keeps "multiscales" at the top of .zattrs; 0.5 nests it under "ome"
    ome = attrs.get("ome")
    multiscales = attrs.get("multiscales", ome.get("multiscales") if isinstance(ome, dict) else None)
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        why = "no .zattrs" if not (path / ".zattrs").is_file() else "no 'multiscales' entry in .zattrs"
        raise VolumeError(f"{path}: not an OME-Zarr image ({why}); OME-NGFF 'multiscales' metadata is needed")
    if len(multiscales) > 1:
        warnings.warn(f"{path}: {len(multiscales)} multiscale images; using the first", stacklevel=4)
    image = multiscales[0]
    version = str(image.get("version", ""))
    if version and version not in ("0.1", "0.2", "0.3", "0.4"):
        warnings.warn(f"{path}: OME-NGFF version {version}; read as 0.4", stacklevel=4)
    return image


def _level_array(group: zarr.Group, dataset: dict, level: int, path: Path) -> zarr.Array:
    name = dataset.get("path")
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise VolumeError(f"{path}: level {level} has no usable 'path' ({name!r}) in the 'multiscales'")
    if not (path / name / ".zarray").is_file():
        raise VolumeError(f"{path}: level {level} (folder {name!r}) has no .zarray; the store is incomplete")
    try:
        array = group[name]
    except Exception as err:  # bad JSON in .zarray, unknown codec
        raise VolumeError(f"{path}: cannot open level {level} ({name}): {type(err).__name__}: {err}") from err
    if not isinstance(array, zarr.Array):
        raise VolumeError(f"{path}: level {level} ({name}) is a group, not an array")
    return array


def _axes(image: dict, ndim: int, path: Path) -> tuple[list[str], list[str], list[Any]]:
    """(names, types, units) of the axes; 0.1/0.2 have none (always t, c, z, y, x), 0.3 has names."""
    axes = image.get("axes")
    if axes is None:
        names = list("tczyx"[-ndim:]) if ndim <= 5 else [f"dim{i}" for i in range(ndim)]
        axes = names
    if not isinstance(axes, list) or len(axes) != ndim:
        count = len(axes) if isinstance(axes, list) else "no list of"
        raise VolumeError(f"{path}: {count} OME-Zarr 'axes' for an array of {ndim} dimensions")
    names, kinds, units = [], [], []
    for axis in axes:
        entry = {"name": axis} if isinstance(axis, str) else axis
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise VolumeError(f"{path}: OME-Zarr axis {axis!r} has no name")
        name = entry["name"]
        kind = entry.get("type") or {"t": "time", "c": "channel"}.get(
            name.lower(), "space" if name.lower() in "zyx" else ""
        )
        names.append(name)
        kinds.append(str(kind))
        units.append(entry.get("unit"))
    return names, kinds, units


def _transforms(image: dict, dataset: dict, ndim: int, path: Path) -> tuple[list[float] | None, list[float]]:
    """Scale and translation of the dataset, composed with the image-wide ones (applied after it)."""
    scale, shift = _scale_shift(dataset.get("coordinateTransformations"), ndim)
    outer_scale, outer_shift = _scale_shift(image.get("coordinateTransformations"), ndim)
    if scale is None or outer_scale is None:
        return None, [0.0] * ndim
    return (
        [a * b for a, b in zip(scale, outer_scale, strict=True)],
        [a * b + c for a, b, c in zip(shift, outer_scale, outer_shift, strict=True)],
    )


def _scale_shift(transforms: Any, ndim: int) -> tuple[list[float] | None, list[float]]:
    """None for the scale when it is not a list of ``ndim`` numbers (e.g. stored in a file)."""
    scale: list[float] | None = [1.0] * ndim
    shift = [0.0] * ndim
    for item in transforms if isinstance(transforms, list) else []:
        kind = item.get("type") if isinstance(item, dict) else None
        values = item.get(kind) if kind in ("scale", "translation") else None
        numbers = _numbers(values, ndim)
        if kind == "scale":
            scale = numbers
        elif kind == "translation" and numbers is not None:
            shift = numbers
    return scale, shift


def _numbers(values: Any, ndim: int) -> list[float] | None:
    if not isinstance(values, list) or len(values) != ndim:
        return None
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _physical(
    scale: list[float] | None, shift: list[float], units: list[Any], lead: int, path: Path
) -> tuple[VoxelSize | None, tuple | None]:
    """Voxel size (nm, z y x) and origin (Angstrom, x y z) of the space axes, or None with a warning."""
    spatial_units = units[lead:]
    factors = [_unit_to_nm(u) for u in spatial_units]
    if any(f is None for f in factors):
        _warn_missing(path, f"OME-Zarr axis units {spatial_units} are not all lengths", depth=1)
        return None, None
    if scale is None or not all(s > 0 for s in scale[lead:]):
        _warn_missing(path, "no usable OME-Zarr scale transformation", depth=1)
        return None, None
    sizes = [s * f for s, f in zip(scale[lead:], factors, strict=True)]  # type: ignore[operator]
    offset = [t * f * 10.0 for t, f in zip(shift[lead:], factors, strict=True)]  # type: ignore[operator]
    if len(sizes) == 2:  # one image: z spacing is that of x (as for a single TIFF page)
        sizes, offset = [sizes[1], *sizes], [0.0, *offset]
    origin = tuple(_round_sig(v) for v in offset[::-1]) if any(offset) else None
    return _clean_voxel(sizes), origin


# ----------------------------------------------------------------------------- writing


def _chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return 1, min(shape[1], CHUNK_SIDE), min(shape[2], CHUNK_SIDE)


def zarr_bytes_to_write(shape: tuple[int, int, int], itemsize: int) -> int:
    """Upper bound of an :class:`OmeZarrSink`'s size on disk: the data as if it did not compress, plus
    a whole block and the compressor's header per chunk file, plus the metadata files."""
    _, cy, cx = _chunks(shape)
    n_chunks = shape[0] * -(-shape[1] // cy) * -(-shape[2] // cx)
    return int(np.prod(shape)) * itemsize + n_chunks * (_BLOCK + 16) + 4 * _BLOCK


def multiscales(name: str, voxel_size_nm: VoxelSize | None, origin_angstrom: tuple | None) -> list[dict]:
    """OME-NGFF 0.4 'multiscales' metadata of one (z, y, x) level at path "0"."""
    axes: list[dict[str, str]] = [{"name": n, "type": "space"} for n in _SPATIAL_NAMES]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
    if voxel_size_nm is not None:  # without a voxel size: no unit, so readers know it is unknown
        for axis in axes:
            axis["unit"] = "nanometer"
        transforms[0]["scale"] = [float(v) for v in voxel_size_nm]
        if origin_angstrom is not None and any(origin_angstrom):
            shift = [float(v) / 10.0 for v in origin_angstrom[::-1]]  # Angstrom (x, y, z) -> nm (z, y, x)
            transforms.append({"type": "translation", "translation": shift})
    return [
        {
            "version": _VERSION,
            "name": name,
            "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": transforms}],
        }
    ]


class OmeZarrSink:
    """Sink: a new OME-Zarr folder ``tmp`` (one level, chunks of one slice), written as blocks arrive.

    Writes are ordinary file writes (no memory map): a full disk raises OSError (ENOSPC), never SIGBUS,
    so nothing is reserved up front. SliceWriter renames the folder into place when it is complete.
    """

    def __init__(
        self,
        tmp: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        vox: VoxelSize | None,
        origin: tuple | None,
        what: str,
    ) -> None:
        if tmp.exists():
            raise VolumeError(f"{tmp}: exists already")
        group = zarr.group(store=zarr.storage.DirectoryStore(str(tmp)))
        name = what[: -len(".ome.zarr")] if what.lower().endswith(".ome.zarr") else what
        group.attrs["multiscales"] = multiscales(name, vox, origin)
        # Every chunk is written, empty ones too: a store of ours that lacks a chunk file is damaged.
        self.array: zarr.Array | None = group.create_dataset(
            "0",
            shape=shape,
            chunks=_chunks(shape),
            dtype=dtype,
            compressor=_COMPRESSOR,
            fill_value=0,
            dimension_separator="/",
            write_empty_chunks=True,
        )

    def write(self, z0: int, block: np.ndarray) -> None:
        self.array[z0 : z0 + block.shape[0]] = block  # type: ignore[index]

    def close(self) -> None:
        self.array = None  # every chunk is on disk already: zarr writes them on assignment

    def abort(self) -> None:
        self.array = None  # the folder itself is removed by atomic_output
