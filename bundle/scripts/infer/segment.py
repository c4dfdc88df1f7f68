"""The slice-segmentation core: a volume's slices -> network -> per-slice post-processing -> sinks.

Both the folder segmenter (``scripts.infer.workflow``) and MONAI Label's infer task call
:func:`segment_volume`, so they share batching, the slice range, TTA variance, probability maps,
the release of memory-mapped pages and voxel-size matching (each batch resampled to the weights'
voxel size and back, ``scripts.infer.resample``). Whole-volume post-processing (removing small 3D
objects) needs the whole mask and is left to the caller, which owns the mask's storage.

By default the next batches are read and the previous ones post-processed and written in two threads
beside the network (``scripts.infer.pipeline``); ``overlap_io=False`` runs the same three steps one
after the other, with the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from scripts.infer.pipeline import run_overlapped
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePrediction, SlicePredictor
from scripts.infer.resample import VoxelMatch
from scripts.io.pages import release_pages, trim_heap
from scripts.io.sinks import Sink
from scripts.io.volume import VolumeError
from tqdm import tqdm

__all__ = ["KINDS", "output_dtype", "segment_volume", "slice_bounds"]

# What a run can write: the mask, the membrane probability, the image decoder's reconstruction and
# the TTA variance.
KINDS = ("mask", "prob", "recon", "uncertainty")


def output_dtype(kind: str, probability: str | None = "uint8") -> np.dtype:
    """The dtype of an output kind: uint8 mask, ``probability`` (uint8 0-255 or float16), else float16."""
    return np.dtype({"mask": np.uint8, "prob": probability or "uint8"}.get(kind, np.float16))


def slice_bounds(slices: Sequence[int] | None, depth: int, name: object = "volume") -> tuple[int, int]:
    """``[z0, z1)`` of ``slices`` clipped to ``depth`` (all slices for None); refuses an empty range."""
    z0, z1 = (0, depth) if slices is None else (max(0, int(slices[0])), min(depth, int(slices[1])))
    if z0 >= z1:
        raise VolumeError(f"{name}: slice range {list(slices or [])} is empty for {depth} slices")
    return z0, z1


def _blocks(start: int, stop: int, size: int, z0: int, z1: int) -> Iterator[tuple[int, int]]:
    """Slice blocks of at most ``size`` that never straddle the segmented range's edges."""
    edges = sorted({start, stop, *(z for z in (z0, z1) if start < z < stop)})
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        for s in range(a, b, size):
            yield s, min(s + size, b)


def _block(kind: str, prediction: SlicePrediction | None, shape: tuple[int, ...], probability: str | None):
    if prediction is None:  # outside the segmented range
        return np.zeros(shape, output_dtype(kind, probability))
    if kind == "prob":
        prob = (prediction.label.numpy() + 1.0) / 2.0
        if probability in (None, "uint8"):
            return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
        return prob.astype(np.float16)
    if kind == "recon":
        return prediction.image.numpy().astype(np.float16)
    return prediction.variance.numpy().astype(np.float16)


def _read(volume: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Slices ``[start, stop)`` in memory; a memory map's pages are handed back at once."""
    view = volume[start:stop]  # indexed once: an OME-Zarr stack reads its chunks on each index
    if not isinstance(view, np.memmap):
        return np.asarray(view)  # already in memory (a zarr read, an array)
    data = np.array(view)  # an own copy: the mapped pages can go now, not when the network is done
    release_pages(view)
    return data


def segment_volume(
    volume: np.ndarray,
    predictor: SlicePredictor,
    postprocessing: PostProcessing,
    sinks: Mapping[str, Sequence[Sink]],
    slices: Sequence[int] | None = None,
    *,
    extent: tuple[int, int] | None = None,
    batch_size: int = 2,
    probability: str | None = "uint8",
    progress: str | None = None,
    voxel_match: VoxelMatch | None = None,
    overlap_io: bool = True,
) -> int:
    """Segment slices ``[z0, z1)`` of a (z, y, x) ``volume`` and write every output kind to its sinks.

    Args:
        volume: the tomogram (a memory map is read batch by batch, its pages released after use).
        predictor: the network on batches of slices (TTA, sliding window, device).
        postprocessing: per-slice threshold, erosion and border crop of the mask.
        sinks: output kind (see :data:`KINDS`) -> sinks receiving it; "uncertainty" needs TTA and
            "recon" a network with the image output.
        slices: ``[z0, z1)`` to segment (clipped to the volume); None: all.
        extent: the slices written, default all; slices outside ``[z0, z1)`` are written as zeros so
            every output keeps the input's shape (ranks sharing a tomogram each write their part).
        batch_size: slices per forward pass.
        probability: dtype of "prob": "uint8" (0-255) or "float16" (0-1).
        progress: a name for a progress bar; None: no bar.
        voxel_match: ``predictor.voxel_match(volume's voxel size)``; when it says ``resampled``, each
            batch runs at the weights' voxel size and its outputs come back on the volume's grid.
            None: slices as they are.
        overlap_io: read the next batches and post-process and write the previous ones in two threads
            while the network runs (``scripts.infer.pipeline``); the outputs are the same either way.
            Each sink still receives its blocks in increasing z, from one thread at a time.

    Returns:
        The foreground voxel count of the mask written (before any whole-volume clean-up).
    """
    depth = volume.shape[0]
    z0, z1 = slice_bounds(slices, depth)
    start_z, stop_z = extent if extent is not None else (0, depth)
    batch_size = max(1, int(batch_size))
    todo = max(0, min(z1, stop_z) - max(z0, start_z))
    bar = tqdm(total=todo, desc=progress, unit="slice", disable=progress is None, leave=False)
    scale = voxel_match.scale if voxel_match is not None and voxel_match.resampled else None
    foreground = 0

    def read(block: tuple[int, int]) -> np.ndarray | None:
        start, stop = block
        return _read(volume, start, stop) if start >= z0 and stop <= z1 else None  # None: zeros

    def compute(block: tuple[int, int], batch: np.ndarray | None) -> SlicePrediction | None:
        if batch is None:
            return None
        prediction = predictor.predict(batch, scale)
        trim_heap()
        bar.update(block[1] - block[0])
        return prediction

    def write(block: tuple[int, int], prediction: SlicePrediction | None) -> None:
        nonlocal foreground
        start, stop = block
        shape = (stop - start, *volume.shape[1:])
        if prediction is None:
            mask = np.zeros(shape, np.uint8)
        else:
            mask = postprocessing.slices(prediction.label.numpy())
        foreground += int(mask.sum())
        for kind, kind_sinks in sinks.items():
            out = mask if kind == "mask" else _block(kind, prediction, shape, probability)
            for sink in kind_sinks:
                sink.write(start, out)

    blocks = _blocks(start_z, stop_z, batch_size, z0, z1)
    try:
        if overlap_io:
            run_overlapped(blocks, read, compute, write)
        else:
            for block in blocks:
                write(block, compute(block, read(block)))
    finally:
        bar.close()
    return foreground
