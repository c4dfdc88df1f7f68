"""Read and write tomograms (MRC, TIFF, NIfTI, OME-Zarr) as (z, y, x) arrays with a voxel size in nm.

Reading memory-maps where the format allows it (an OME-Zarr store reads only the chunks an index
touches, ``scripts.io.omezarr``), so a 4 GB tomogram is never loaded whole just to be opened. Writing
always goes through ``atomic_output``: a file (or store folder) appears under its final name only when
complete. Conventions are documented in docs/data.md.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import mrcfile
import nibabel as nib
import numpy as np
import tifffile
from scripts.io.atomic import PARTIAL_MARKER, atomic_output, full_suffix
from scripts.io.diskspace import new_memmap, reserve
from scripts.io.pages import release_pages
from scripts.io.sinks import Sink

__all__ = [
    "FORMAT_SUFFIXES",
    "MRC_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "VOLUME_SUFFIXES",
    "ZARR_SUFFIXES",
    "SliceWriter",
    "Volume",
    "VolumeError",
    "as_float_slice",
    "bytes_to_write",
    "find_volumes",
    "is_volume_file",
    "iter_slabs",
    "open_volume",
    "volume_exists",
    "volume_stem",
    "volume_suffix",
    "write_volume",
]

MRC_SUFFIXES = (".mrc", ".rec", ".st", ".map", ".mrcs")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = MRC_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES  # single files (MONAI Label uploads)
ZARR_SUFFIXES = (".ome.zarr", ".zarr")  # OME-Zarr stores: folders
# Output format names (inference `formats`, the simulator's --formats) and the suffix each writes.
FORMAT_SUFFIXES = {
    "mrc": ".mrc",
    "tif": ".tif",
    "tiff": ".tif",
    "nii": ".nii.gz",
    "nii.gz": ".nii.gz",
    "ome.zarr": ".ome.zarr",
    "zarr": ".ome.zarr",
}
VOLUME_SUFFIXES = SUPPORTED_SUFFIXES + ZARR_SUFFIXES

VoxelSize = tuple[float, float, float]

_CHUNK_BYTES = 64 * 2**20  # slab size for chunked scans and writes
IMOD_STAMP = 1146047817  # b"IMOD": header bytes 152-155; imodFlags (156-159) bit 0 = bytes are signed
_IMOD_OFFSET_IN_EXTRA2 = 152 - 112  # extra2 starts at byte 112 of the MRC header
# MRC modes we write; uint8 is stored as mode 0 with the IMOD "unsigned" flag (see docs/data.md).
_MRC_MODES = {
    np.dtype(np.uint8): 0,
    np.dtype(np.int8): 0,
    np.dtype(np.int16): 1,
    np.dtype(np.float32): 2,
    np.dtype(np.uint16): 6,
    np.dtype(np.float16): 12,
}
_IMAGEJ_DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}
_UNIT_NM = {
    **dict.fromkeys(["nm", "nanometer", "nanometers", "nanometre", "nanometres"], 1.0),
    **dict.fromkeys(
        [
            "um",
            "\u00b5m",
            "\u03bcm",
            "\\u00b5m",
            "micron",
            "microns",
            "micrometer",
            "micrometers",
            "micrometre",
            "micrometres",
        ],
        1e3,
    ),
    **dict.fromkeys(["mm", "millimeter", "millimeters", "millimetre", "millimetres"], 1e6),
    **dict.fromkeys(["cm", "centimeter", "centimeters"], 1e7),
    **dict.fromkeys(["m", "meter", "meters", "metre", "metres"], 1e9),
    **dict.fromkeys(["a", "\u00e5", "angstrom", "angstroms", "\u00e5ngstr\u00f6m"], 0.1),
}


_MISSING = "voxel size unknown"


class VolumeError(ValueError):
    """A volume file is missing, unreadable or unsuitable; the message names the file."""


@dataclass
class Volume:
    """A tomogram as a (z, y, x) array (often a read-only memmap) with its voxel size in nm."""

    data: np.ndarray
    voxel_size_nm: VoxelSize | None = None  # (z, y, x)
    path: Path = field(default_factory=lambda: Path("<in-memory>"))
    origin_angstrom: tuple[float, float, float] | None = None  # MRC header order (x, y, z)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


# ----------------------------------------------------------------------------- names


def volume_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix used for format dispatch (``.nii.gz`` counted as one)."""
    return full_suffix(path).lower()


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its volume suffix: ``a.nii.gz`` -> ``a``."""
    name = Path(path).name
    suffix = full_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def _format_of(path: Path) -> str:
    suffix = volume_suffix(path)
    if suffix in MRC_SUFFIXES:
        return "mrc"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    raise VolumeError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; supported: {', '.join(VOLUME_SUFFIXES)}")


def is_volume_file(path: str | os.PathLike) -> bool:
    """True for a visible, complete volume name with a supported suffix (temp ``.partial-`` ones excluded).

    OME-Zarr stores (``.zarr``, ``.ome.zarr``) count too: they are folders.
    """
    name = Path(path).name
    return not name.startswith(".") and PARTIAL_MARKER not in name and volume_suffix(name) in VOLUME_SUFFIXES


def volume_exists(path: str | os.PathLike) -> bool:
    """A file, or for the OME-Zarr suffixes a folder, at ``path``."""
    path = Path(path)
    return path.is_dir() if volume_suffix(path) in ZARR_SUFFIXES else path.is_file()


def find_volumes(folder: str | os.PathLike) -> list[Path]:
    """Sorted volumes in ``folder`` (files, and OME-Zarr folders; not recursive); VolumeError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: folder does not exist")
    found = sorted(p for p in folder.iterdir() if is_volume_file(p) and volume_exists(p))
    if not found:
        raise VolumeError(f"{folder}: no volume files found (supported: {', '.join(VOLUME_SUFFIXES)})")
    return found


# ----------------------------------------------------------------------------- reading


def open_volume(
    path: str | os.PathLike,
    voxel_size_nm: float | Sequence[float] | None = None,
    *,
    allow_2d: bool = False,
    check_finite: bool = True,
    level: int = 0,
) -> Volume:
    """Open a volume as (z, y, x) without reading it whole where the format allows.

    ``voxel_size_nm`` (a float or a (z, y, x) tuple) overrides the header. ``allow_2d`` returns a
    single image as shape (1, y, x) instead of refusing it. ``check_finite`` scans float data slab by
    slab and refuses NaN/inf (set False to open headers only). ``level`` is the resolution level of an
    OME-Zarr store (0: the highest); the other formats have one level and ignore it.
    """
    path = Path(path)
    fmt = _format_of(path)
    override = _voxel_tuple(voxel_size_nm, path) if voxel_size_nm is not None else None
    if fmt == "zarr" and not path.is_dir():
        what = "is a file; an OME-Zarr store is a folder" if path.exists() else "folder does not exist"
        raise VolumeError(f"{path}: {what}")
    if fmt != "zarr" and not path.is_file():
        raise VolumeError(f"{path}: file does not exist")
    readers = {"mrc": _read_mrc, "tiff": _read_tiff, "nifti": _read_nifti}
    reader = partial(_read_zarr, level=level) if fmt == "zarr" else readers[fmt]
    try:
        with warnings.catch_warnings():
            if override is not None:  # the header's voxel size is not used: no warning about it
                warnings.filterwarnings("ignore", message=f".*{_MISSING}")
            data, vox, origin = reader(path)
    except VolumeError:
        raise
    except Exception as err:  # format libraries raise many types; callers get one, naming the file
        hint = "; the file is shorter than its header says (truncated?)" if "mmap length" in str(err) else ""
        name = "OME-Zarr" if fmt == "zarr" else fmt.upper()
        raise VolumeError(f"{path}: cannot read as {name} ({type(err).__name__}: {err}){hint}") from err
    data = _as_stack(data, path, allow_2d)
    if data.dtype.kind not in "iuf":
        raise VolumeError(f"{path}: unsupported data type {data.dtype} (need integer or real float data)")
    if check_finite:
        _check_finite(data, path)
    if override is not None:
        vox = override
    return Volume(data=data, voxel_size_nm=vox, path=path, origin_angstrom=origin)


def _as_stack(data: np.ndarray, path: Path, allow_2d: bool) -> np.ndarray:
    """Squeeze a leading/trailing singleton beyond 3D; refuse 4D and (unless allowed) 2D."""
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise VolumeError(f"{path}: {data.ndim}D data of shape {data.shape}; expected one 3D stack (z, y, x)")
    if data.ndim < 2 or 0 in data.shape:
        raise VolumeError(f"{path}: data of shape {data.shape} is not an image")
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.shape[0] == 1 and not allow_2d:
        raise VolumeError(f"{path}: a single 2D image of shape {data.shape[1:]}; expected a stack of slices")
    return data


def iter_slabs(n_slices: int, slice_bytes: int, budget: int = _CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of whole slices of about ``budget`` bytes each."""
    step = max(1, budget // max(1, slice_bytes))
    for start in range(0, n_slices, step):
        yield start, min(n_slices, start + step)


def _check_finite(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind != "f":
        return
    bad: list[int] = []
    slice_bytes = data[0].nbytes
    for start, stop in iter_slabs(data.shape[0], slice_bytes):
        block = data[start:stop]  # once: indexing an OME-Zarr store reads it
        ok = np.isfinite(block).all(axis=(1, 2))
        release_pages(block)
        bad.extend(int(start + i) for i in np.flatnonzero(~ok))
    if bad:
        raise VolumeError(
            f"{path}: {len(bad)} of {data.shape[0]} slices contain NaN or inf values "
            f"(first at z={bad[0]}); fix the file, it is not repaired automatically"
        )


def as_float_slice(volume: Volume | np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` as a new, writable float32 (y, x) array."""
    data = volume.data if isinstance(volume, Volume) else volume
    return np.array(data[z], dtype=np.float32, copy=True)


def _round_sig(value: float, digits: int = 6) -> float:
    """Drop float32 noise from header values (98.1 stored as 98.09999847)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _clean_voxel(values: Sequence[float]) -> VoxelSize:
    return tuple(_round_sig(float(v)) for v in values)  # type: ignore[return-value]


def _voxel_tuple(value: float | Sequence[float] | None, path: Path) -> VoxelSize | None:
    if value is None:
        return None
    vals = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]  # type: ignore[union-attr]
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise VolumeError(f"{path}: voxel size must be a positive number or (z, y, x) triple, got {value!r}")
    return tuple(vals)  # type: ignore[return-value]


def _warn_missing(path: Path, why: str, depth: int = 0) -> None:
    """Warn from the caller of open_volume; ``depth`` = helper levels below the format reader."""
    warnings.warn(f"{path}: {_MISSING} ({why}); pass voxel_size_nm to set it", stacklevel=4 + depth)


def _read_mrc(path: Path) -> tuple[np.ndarray, VoxelSize | None, tuple | None]:
    with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
        header = mrc.header
        data = mrc.data  # the memmap stays valid after the file object is closed
        mode = int(header.mode)
        vs = mrc.voxel_size
        vox_a = (float(vs.z), float(vs.y), float(vs.x))
        origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
        stamp, flags = np.frombuffer(
            header.extra2.tobytes()[_IMOD_OFFSET_IN_EXTRA2 : _IMOD_OFFSET_IN_EXTRA2 + 8],
            dtype=header.dtype["nx"],
        )
        axes = (int(header.mapc), int(header.mapr), int(header.maps))
    if data is None:
        raise VolumeError(f"{path}: MRC file has no data block")
    if mode == 0 and stamp == IMOD_STAMP and not flags & 1:
        data = data.view(np.uint8)  # IMOD convention: mode 0 without the "signed" flag is unsigned
    if axes != (1, 2, 3):
        warnings.warn(f"{path}: MRC axis order (mapc, mapr, maps) = {axes}; data used as stored", stacklevel=3)
    vox: VoxelSize | None
    if any(v in (0.0, 1.0) or not math.isfinite(v) for v in vox_a):
        _warn_missing(path, f"header voxel size {vox_a[::-1]} Angstrom (x, y, z) looks unset")
        vox = None
    else:
        vox = _clean_voxel([v / 10.0 for v in vox_a])
    return data, vox, (origin if any(origin) else None)


def _unit_to_nm(unit: Any) -> float | None:
    if not isinstance(unit, str):
        return None
    return _UNIT_NM.get(unit.strip().lower())


def _read_tiff(path: Path) -> tuple[np.ndarray, VoxelSize | None, tuple | None]:
    with tifffile.TiffFile(path) as tif:
        if len(tif.series) > 1:
            warnings.warn(f"{path}: {len(tif.series)} image series; using the first", stacklevel=3)
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        page = series.keyframe
        if ("S" in axes and shape[axes.index("S")] > 1) or page.photometric in (
            tifffile.PHOTOMETRIC.RGB,
            tifffile.PHOTOMETRIC.YCBCR,
        ):
            raise VolumeError(f"{path}: RGB/colour TIFF (axes {axes}, shape {shape}); save it as grayscale")
        keep = [i for i, (ax, n) in enumerate(zip(axes, shape, strict=True)) if n > 1 or ax in "YX"]
        kept_axes = "".join(axes[i] for i in keep)
        kept_shape = tuple(shape[i] for i in keep)
        if len(kept_shape) > 3:
            raise VolumeError(
                f"{path}: {len(kept_shape)}D TIFF (axes {kept_axes}, shape {kept_shape}); expected one 3D stack"
            )
        vox = _tiff_voxel_size(tif, page, path, is_2d=len(kept_shape) == 2)
        data = _tiff_memmap(path)
        if data is None:  # compressed or scattered pages: read whole
            data = series.asarray()
    return data.reshape(kept_shape), vox, None


def _tiff_memmap(path: Path) -> np.ndarray | None:
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:  # "not memory-mappable": compressed, tiled or non-contiguous
        return None


def _tiff_voxel_size(tif: tifffile.TiffFile, page: Any, path: Path, is_2d: bool) -> VoxelSize | None:
    """ImageJ unit/spacing, OME PhysicalSize, or our own shaped-TIFF metadata; else None with a warning."""
    if tif.is_ome and tif.ome_metadata:
        vox = _ome_voxel_size(tif.ome_metadata, is_2d)
        if vox is not None:
            return vox
    ij = tif.imagej_metadata or {}
    shaped = (tif.shaped_metadata or [{}])[0] if tif.is_shaped else {}
    xres, yres = page.resolution
    if ij:
        xy_unit = _unit_to_nm(ij.get("unit"))
    elif int(page.resolutionunit) == int(tifffile.RESUNIT.CENTIMETER):
        xy_unit = 1e7
    else:  # no unit, or inches: a default dpi, never a microscope calibration
        xy_unit = None
    if xy_unit is None or not (xres > 0 and yres > 0):
        _warn_missing(path, "no calibrated resolution in the TIFF tags/ImageJ metadata", depth=1)
        return None
    x, y = xy_unit / xres, xy_unit / yres
    if ij:  # ImageJ omits spacing when it is 1 unit
        z_unit = _unit_to_nm(ij.get("zunit", ij.get("unit")))
        z = float(ij.get("spacing", 1.0)) * z_unit if z_unit else None
    elif "spacing" in shaped and _unit_to_nm(shaped.get("unit")):
        z = float(shaped["spacing"]) * _unit_to_nm(shaped.get("unit"))  # type: ignore[operator]
    else:
        z = x if is_2d else None  # a single image has no z spacing; keep x/y
    if z is None or not z > 0:
        _warn_missing(path, "no z spacing in the TIFF metadata", depth=1)
        return None
    return _clean_voxel((z, y, x))


def _ome_voxel_size(xml: str, is_2d: bool) -> VoxelSize | None:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for ax in "ZYX":
        value, unit = pixels.get(f"PhysicalSize{ax}"), pixels.get(f"PhysicalSize{ax}Unit", "\u00b5m")
        factor = _unit_to_nm(unit)
        sizes.append(float(value) * factor if value is not None and factor else None)
    if sizes[0] is None and is_2d:
        sizes[0] = sizes[2]
    if any(s is None or not s > 0 for s in sizes):
        return None
    return _clean_voxel(sizes)  # type: ignore[arg-type]


def _read_zarr(path: Path, level: int = 0) -> tuple[Any, VoxelSize | None, tuple | None]:
    from scripts.io.omezarr import read_omezarr  # imported when needed: it imports this module

    return read_omezarr(path, level)


def _read_nifti(path: Path) -> tuple[np.ndarray, VoxelSize | None, tuple | None]:
    img = nib.load(str(path))
    header = img.header
    data = np.asanyarray(img.dataobj)  # memmap for uncompressed, unscaled .nii
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    ndim = min(data.ndim, 3)
    data = data.T  # NIfTI arrays are (x, y, z); .T is (z, y, x) and C-contiguous for on-disk data
    space_unit = header.get_xyzt_units()[0]
    factor = {"meter": 1e9, "mm": 1e6, "micron": 1e3}.get(space_unit, 1e6)  # 'unknown': assume mm
    zooms = [float(z) for z in header.get_zooms()[:ndim]]
    if ndim == 2:
        zooms.append(zooms[0])
    vox: VoxelSize | None
    if any(not z > 0 for z in zooms) or (space_unit == "unknown" and all(z == 1.0 for z in zooms)):
        _warn_missing(path, f"NIfTI zooms {tuple(zooms)} with units {space_unit!r} look unset")
        vox = None
    else:
        vox = _clean_voxel([z * factor for z in zooms[::-1]])
    shift = np.asarray(img.affine[:3, 3], dtype=float) * factor * 10.0  # to Angstrom, (x, y, z)
    origin = tuple(_round_sig(float(v)) for v in shift) if np.any(shift) else None
    return data, vox, origin


# ----------------------------------------------------------------------------- writing


def _target_dtype(fmt: str, dtype: np.dtype, path: Path) -> np.dtype:
    """On-disk dtype for ``dtype`` (without looking at values); VolumeError if the format cannot."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind not in "iuf":
        raise VolumeError(f"{path}: cannot write data of type {dtype}")
    if fmt == "mrc":
        if dtype in _MRC_MODES:
            return dtype
        if dtype.kind == "f":
            return np.dtype(np.float32)
        raise VolumeError(f"{path}: MRC has no mode for {dtype}; use uint8, int8, int16, uint16, float16 or float32")
    if fmt == "nifti" and dtype == np.float16:
        return np.dtype(np.float32)  # NIfTI-1 has no float16; float32 holds it exactly
    return dtype


def bytes_to_write(path: str | os.PathLike, shape: Sequence[int], dtype: Any) -> int:
    """Upper bound of the disk space a :class:`SliceWriter` of ``path`` uses at its peak.

    Headers, TIFF page tables and the NIfTI buffer included, rounded up to whole 64 KiB blocks, so
    that a run can check the free space before it starts a tomogram.
    """
    path = Path(path)
    fmt = _format_of(path)
    shape = tuple(int(n) for n in shape)
    itemsize = _target_dtype(fmt, np.dtype(dtype), path).itemsize
    data = int(np.prod(shape)) * itemsize
    if fmt == "mrc":
        total = data + 1024
    elif fmt == "tiff":
        total = data + 4096 + 512 * shape[0]  # one IFD per slice
    elif fmt == "zarr":  # compressed, but incompressible data would not shrink: counted uncompressed
        from scripts.io.omezarr import zarr_bytes_to_write

        total = zarr_bytes_to_write(shape, itemsize)  # type: ignore[arg-type]
    else:  # buffer, then the file nibabel writes (gzip can grow incompressible data a little)
        total = data + data + data // 100 + 4096
    block = 64 * 1024
    return -(-total // block) * block


def _narrow_int(array: np.ndarray) -> np.dtype:
    """Smallest MRC integer dtype holding the values of a wide integer array (scanned in slabs)."""
    lo, hi = 0, 0
    for start, stop in iter_slabs(array.shape[0], array[0].nbytes):
        block = array[start:stop]
        lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
    for candidate in (np.uint8, np.int8, np.int16, np.uint16):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return np.dtype(candidate)
    raise VolumeError(f"values {lo}..{hi} do not fit an MRC integer mode")


def _cast_block(block: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """Cast a block to the file dtype; refuse float->int and integer overflow instead of wrapping."""
    if block.dtype == dtype or block.dtype == np.bool_:
        return block.astype(dtype, copy=False)
    if dtype.kind in "iu":
        if block.dtype.kind not in "iu":
            raise VolumeError(
                f"{path}: refusing to write {block.dtype} data into an {dtype} file; threshold or cast it first"
            )
        info = np.iinfo(dtype)
        if block.size and (block.min() < info.min or block.max() > info.max):
            raise VolumeError(f"{path}: values {block.min()}..{block.max()} do not fit {dtype}")
    return block.astype(dtype, copy=False)


class _MrcSink:
    """Sink: an MRC file through mrcfile's memory map; header statistics are set on close."""

    def __init__(
        self,
        tmp: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        vox: VoxelSize | None,
        origin: tuple | None,
        what: str,
    ) -> None:
        self.mrc = mrcfile.new_mmap(tmp, shape=shape, mrc_mode=_MRC_MODES[dtype], overwrite=True)
        try:
            reserve(tmp, what)  # before the first write through the map (see diskspace.py)
        except BaseException:
            self.mrc.close()
            raise
        header = self.mrc.header
        if _MRC_MODES[dtype] == 0:  # say explicitly whether bytes are signed (IMOD, 3dmod, MIB honour it)
            extra = bytearray(header.extra2.tobytes())
            signed = int(dtype == np.int8)
            stamp = np.array([IMOD_STAMP, signed], dtype=header.dtype["nx"]).tobytes()
            extra[_IMOD_OFFSET_IN_EXTRA2 : _IMOD_OFFSET_IN_EXTRA2 + 8] = stamp
            header.extra2 = np.void(bytes(extra))
        if vox is not None:
            self.mrc.voxel_size = tuple(10.0 * v for v in vox[::-1])  # Angstrom, (x, y, z)
        if origin is not None:
            header.origin.x, header.origin.y, header.origin.z = origin
        self.data = self.mrc.data.view(dtype)  # int8 memmap viewed as uint8 for unsigned masks
        self.stats = [math.inf, -math.inf, 0.0, 0.0]  # min, max, sum, sum of squares

    def write(self, z0: int, block: np.ndarray) -> None:
        self.data[z0 : z0 + block.shape[0]] = block
        release_pages(self.data[z0 : z0 + block.shape[0]])
        as64 = block.astype(np.float64)
        self.stats[0] = min(self.stats[0], float(as64.min()))
        self.stats[1] = max(self.stats[1], float(as64.max()))
        self.stats[2] += float(as64.sum())
        self.stats[3] += float(np.square(as64).sum())

    def close(self) -> None:
        # mrcfile's own stats would read uint8 masks as int8; set them from the written values
        n = self.data.size
        mean = self.stats[2] / n
        header = self.mrc.header
        header.dmin, header.dmax, header.dmean = self.stats[0], self.stats[1], mean
        header.rms = math.sqrt(max(0.0, self.stats[3] / n - mean * mean))
        self.data = None
        self.mrc.close()

    def abort(self) -> None:
        self.data = None
        self.mrc.close()


def _tiff_options(dtype: np.dtype, vox: VoxelSize | None) -> dict[str, Any]:
    """ImageJ hyperstack for the types ImageJ has (uint8, uint16, float32), else a shaped TIFF."""
    imagej = dtype in _IMAGEJ_DTYPES
    metadata: dict[str, Any] = {"axes": "ZYX"}
    # explicit photometric: otherwise tifffile may take a last axis of 3 or 4 for RGB(A) samples
    options: dict[str, Any] = {"imagej": imagej, "metadata": metadata, "photometric": "minisblack"}
    if vox is not None:
        z, y, x = vox
        metadata.update(spacing=z, unit="nm")
        if imagej:  # ImageJ reads pixels per unit, the unit coming from the description
            options["resolution"] = (1.0 / x, 1.0 / y)
        else:  # standard TIFF tags: pixels per centimetre
            options.update(resolution=(1e7 / x, 1e7 / y), resolutionunit="CENTIMETER")
    return options


class _TiffSink:
    """Sink: an uncompressed TIFF through tifffile's memory map."""

    def __init__(
        self,
        tmp: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        vox: VoxelSize | None,
        origin: tuple | None,
        what: str,
    ) -> None:
        # An uncompressed, contiguous TIFF written through a memmap: slices may come in any order.
        options = _tiff_options(dtype, vox)
        with warnings.catch_warnings():
            # > 4 GB: tifffile writes one IFD and ImageJ reads the rest from "images=" (docs/data.md)
            warnings.filterwarnings("ignore", message=".*truncating ImageJ file")
            self.data: np.memmap | None = tifffile.memmap(tmp, shape=shape, dtype=dtype, **options)
        try:
            reserve(tmp, what)  # before the first write through the map (see diskspace.py)
        except BaseException:
            self.data = None
            raise

    def write(self, z0: int, block: np.ndarray) -> None:
        self.data[z0 : z0 + block.shape[0]] = block  # type: ignore[index]
        release_pages(self.data[z0 : z0 + block.shape[0]])  # type: ignore[index]

    def close(self) -> None:
        self.data.flush()  # type: ignore[union-attr]
        self.data = None

    def abort(self) -> None:
        self.data = None


def _nifti_image(data_zyx: np.ndarray, dtype: np.dtype, vox: VoxelSize | None, origin: tuple | None) -> nib.Nifti1Image:
    """NIfTI-1 image: array stored (x, y, z), zooms and translation in mm (docs/data.md)."""
    zooms = [v * 1e-6 for v in vox[::-1]] if vox is not None else [1.0, 1.0, 1.0]
    affine = np.diag([*zooms, 1.0])
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=float) * 1e-7  # Angstrom -> mm
    if data_zyx.dtype != dtype:  # nibabel refuses float16 arrays even when asked to store float32
        data_zyx = data_zyx.astype(dtype)
    img = nib.Nifti1Image(data_zyx.T, affine, dtype=dtype)
    img.header.set_xyzt_units("mm" if vox is not None else "unknown")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


class _NiftiSink:
    """Sink: a raw memory-mapped buffer, saved as NIfTI by nibabel on close."""

    def __init__(
        self,
        tmp: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        vox: VoxelSize | None,
        origin: tuple | None,
        what: str,
    ) -> None:
        self.tmp, self.dtype, self.vox, self.origin = tmp, dtype, vox, origin
        self.buffer_path = tmp.with_name(tmp.name + ".buffer")  # hidden and marked partial too
        self.data: np.memmap | None = new_memmap(self.buffer_path, dtype, shape, what)

    def write(self, z0: int, block: np.ndarray) -> None:
        self.data[z0 : z0 + block.shape[0]] = block  # type: ignore[index]
        release_pages(self.data[z0 : z0 + block.shape[0]])  # type: ignore[index]

    def close(self) -> None:
        try:
            nib.save(_nifti_image(self.data, self.dtype, self.vox, self.origin), self.tmp)
        finally:
            self.abort()

    def abort(self) -> None:
        self.data = None
        self.buffer_path.unlink(missing_ok=True)


def _zarr_sink(*args: Any) -> Sink:
    from scripts.io.omezarr import OmeZarrSink  # imported when needed: it imports this module

    return OmeZarrSink(*args)


# The format sinks behind SliceWriter (each a scripts.io.sinks.Sink writing a temporary file or folder).
_SINKS: dict[str, Callable[..., Sink]] = {"mrc": _MrcSink, "tiff": _TiffSink, "nifti": _NiftiSink, "zarr": _zarr_sink}


class SliceWriter:
    """Write a volume block by block; the file appears under ``path`` only when complete.

    ``with SliceWriter(path, shape, dtype, voxel_size_nm, like=vol) as w: w.write(z0, block)``.
    Blocks are (n, y, x) (or one (y, x) slice) and may come in any order; every slice must be written
    exactly once or more before the ``with`` ends. MRC and TIFF are written through a memory map of the
    output file itself; NIfTI goes through a temporary memmap buffer next to it, then nibabel; OME-Zarr
    (a folder) chunk by chunk as blocks arrive (``scripts.io.omezarr``).
    On an exception nothing is left behind. Also a :class:`~scripts.io.sinks.Sink` (``close``/``abort``
    for callers that do not use ``with``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        voxel_size_nm: float | Sequence[float] | None = None,
        like: Volume | None = None,
    ) -> None:
        self.path = Path(path)
        self.fmt = _format_of(self.path)
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise VolumeError(f"{self.path}: shape must be (z, y, x) with positive sizes, got {shape}")
        self.dtype = _target_dtype(self.fmt, np.dtype(dtype), self.path)
        vox = _voxel_tuple(voxel_size_nm, self.path)
        self.voxel_size_nm = vox if vox is not None else (like.voxel_size_nm if like is not None else None)
        self.origin_angstrom = like.origin_angstrom if like is not None else None
        self._written = np.zeros(self.shape[0], dtype=bool)
        self._sink: Any = None
        self._atomic: Any = None

    def __enter__(self) -> SliceWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        try:
            sink_type = _SINKS[self.fmt]
            self._sink = sink_type(
                tmp, self.shape, self.dtype, self.voxel_size_nm, self.origin_angstrom, self.path.name
            )
        except BaseException as err:
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, z_start: int, block: np.ndarray) -> None:
        """Write ``block`` (n, y, x) at slices ``z_start .. z_start + n - 1``."""
        if self._sink is None:
            raise VolumeError(f"{self.path}: SliceWriter.write called outside its `with` block")
        block = np.asarray(block)
        if block.ndim == 2:
            block = block[np.newaxis]
        n = block.shape[0]
        if block.ndim != 3 or block.shape[1:] != self.shape[1:] or not 0 <= z_start <= self.shape[0] - n:
            raise VolumeError(
                f"{self.path}: block of shape {block.shape} at z={z_start} does not fit volume shape {self.shape}"
            )
        self._sink.write(z_start, _cast_block(block, self.dtype, self.path))
        self._written[z_start : z_start + n] = True

    def close(self) -> None:
        """Every slice is written: finish the file and rename it into place (as ``with`` does)."""
        self.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the partial file (as ``with`` does on an exception)."""
        self.__exit__(VolumeError, VolumeError(f"{self.path}: writing aborted"), None)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        sink, self._sink = self._sink, None
        if exc_type is None:
            try:
                missing = int((~self._written).sum())
                if missing:
                    raise VolumeError(f"{self.path}: {missing} of {self.shape[0]} slices were never written")
                sink.close()
            except BaseException as err:
                sink.abort()
                self._atomic.__exit__(type(err), err, err.__traceback__)
                raise
            self._atomic.__exit__(None, None, None)  # rename into place
            return False
        sink.abort()
        self._atomic.__exit__(exc_type, exc, tb)  # removes the temporary file
        return False


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray | Volume,
    voxel_size_nm: float | Sequence[float] | None = None,
    *,
    like: Volume | None = None,
    compression: str | None = None,
) -> Path:
    """Write a (z, y, x) array (a 2D array is one slice) atomically; format from the suffix.

    Voxel size: ``voxel_size_nm`` if given, else ``like.voxel_size_nm``; MRC/NIfTI origin from ``like``.
    ``compression`` (e.g. "zlib") is for TIFF only. Large arrays (memmaps too) are written in slabs.
    """
    path = Path(path)
    fmt = _format_of(path)
    if isinstance(array, Volume):
        like = like if like is not None else array
        array = array.data
    data = np.asanyarray(array)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise VolumeError(f"{path}: expected a (z, y, x) array, got shape {data.shape}")
    if compression is not None and fmt != "tiff":
        raise VolumeError(f"{path}: compression is only supported for TIFF output")
    if fmt == "mrc" and data.dtype.kind in "iu" and data.dtype not in _MRC_MODES:
        try:
            dtype = _narrow_int(data)
        except VolumeError as err:
            raise VolumeError(f"{path}: {err}") from None
    else:
        dtype = _target_dtype(fmt, data.dtype, path)
    vox = _voxel_tuple(voxel_size_nm, path)
    if vox is None and like is not None:
        vox = like.voxel_size_nm
    origin = like.origin_angstrom if like is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "nifti":
        with atomic_output(path) as tmp:
            nib.save(_nifti_image(data, dtype, vox, origin), tmp)
    elif compression is not None:  # compressed TIFF cannot be memory-mapped: stream the pages
        pages = (_cast_block(np.asarray(data[z]), dtype, path) for z in range(data.shape[0]))
        with atomic_output(path) as tmp:
            tifffile.imwrite(
                tmp, data=pages, shape=data.shape, dtype=dtype, compression=compression, **_tiff_options(dtype, vox)
            )
    else:
        with SliceWriter(path, data.shape, dtype, vox, like=like) as writer:
            for start, stop in iter_slabs(data.shape[0], data[0].nbytes):
                writer.write(start, np.asarray(data[start:stop]))
    return path
