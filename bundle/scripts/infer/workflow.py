"""Segment every tomogram of a folder, slice by slice, with bounded memory and resumable outputs."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
from scripts.infer.ood import ReconstructionScorer, ood_warning
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePredictor
from scripts.infer.ranks import join, leave, share_range, sum_over_ranks
from scripts.infer.resample import VoxelMatch
from scripts.infer.segment import KINDS, output_dtype, segment_volume, slice_bounds
from scripts.io.atomic import PARTIAL_MARKER, atomic_output, output_folder, remove_output
from scripts.io.diskspace import check_free_space, new_memmap
from scripts.io.locks import FileLock
from scripts.io.pages import release_pages
from scripts.io.sinks import ArraySink
from scripts.io.volume import (
    FORMAT_SUFFIXES,
    SliceWriter,
    Volume,
    VolumeError,
    bytes_to_write,
    find_volumes,
    open_volume,
    volume_exists,
    volume_stem,
)
from scripts.options import as_bool, as_choice, as_names, as_optional, as_range, as_voxel_size

__all__ = ["TomogramSegmenter", "InferenceError"]

logger = logging.getLogger(__name__)

SUFFIXES = FORMAT_SUFFIXES  # output format name -> file suffix


class InferenceError(RuntimeError):
    """Some tomograms could not be segmented; the others were."""


class TomogramSegmenter:
    """Segment a folder of tomograms with a :class:`SlicePredictor`.

    Per tomogram ``NAME`` it writes into ``output_dir``: ``NAME_mask`` (uint8 0/1), optionally
    ``NAME_prob`` (membrane probability ``(tanh + 1) / 2`` as uint8 0-255 or float16),
    ``NAME_recon`` (the image decoder's reconstruction, float16), ``NAME_uncertainty`` (TTA variance,
    float16), in each of ``formats``, then ``NAME_summary.json``. The summary is written last: a
    tomogram whose summary and outputs exist is complete and skipped on a rerun.

    Runs may share an output folder: a run holds ``.NAME.lock`` while it writes NAME, another run
    does the other tomograms first and then waits for that one (docs/inference.md).

    Args:
        predictor: runs the network on batches of slices.
        postprocessing: threshold and clean-up of the mask.
        output_dir: where outputs go (created).
        formats: any of "mrc", "tif", "nii.gz", "ome.zarr" (a chunked OME-Zarr folder per output).
        probability: None, "uint8" or "float16".
        reconstruction: also save the image decoder's output.
        batch_size: slices per forward pass.
        slice_range: ``[z0, z1)`` to segment; other slices stay 0 so outputs align with the input.
        voxel_size_nm: overrides the header voxel size (float or (z, y, x)); also the voxel size that
            the predictor's voxel-size matching compares with the weights'.
        overwrite: segment again even when outputs are complete.
        weights: name of the weights file, recorded in the summaries.
        distribute: under torchrun, "tomograms" gives each rank whole tomograms, "slices" has all
            ranks share each tomogram's slices (one large tomogram), "auto" picks "slices" when the
            folder holds fewer tomograms than there are ranks.
        ood: the out-of-distribution score (``scripts.infer.ood``), computed on a few slices of each
            tomogram after its masks are written (on rank 0 when ranks share slices); None or a
            scorer with 0 slices: off.
        zarr_level: the resolution level read from OME-Zarr inputs (0: the highest; other formats
            have one level).
        overlap_io: read and write in two threads beside the network (``segment_volume``); False: one
            step after the other. The outputs are the same.
    """

    def __init__(
        self,
        predictor: SlicePredictor,
        postprocessing: PostProcessing,
        output_dir: str | os.PathLike,
        formats: Sequence[str] = ("mrc", "tif"),
        probability: str | None = None,
        reconstruction: bool = False,
        batch_size: int = 2,
        slice_range: Sequence[int] | None = None,
        voxel_size_nm: float | Sequence[float] | None = None,
        overwrite: bool = False,
        weights: str | os.PathLike | None = None,
        progress: bool = True,
        distribute: str = "auto",
        ood: ReconstructionScorer | None = None,
        zarr_level: int | str = 0,
        overlap_io: bool | str = True,
    ) -> None:
        names = as_names(formats, "formats")  # "[ome.zarr, mrc]" and "mrc" arrive as strings from the CLI
        if not names or any(f not in SUFFIXES for f in names):
            raise ValueError(f"output formats must be among {sorted(SUFFIXES)}, got {formats!r}")
        distribute = as_choice(distribute, "distribute", ("auto", "tomograms", "slices"))
        probability = as_optional(probability)
        if probability not in (None, "uint8", "float16"):
            raise ValueError(f"probability must be null, 'uint8' or 'float16', got {probability!r}")
        reconstruction = as_bool(reconstruction, "reconstruction")
        if reconstruction and not predictor.with_image:
            raise ValueError("reconstruction needs a network built with outputs='both'")
        self.predictor = predictor
        self.post = postprocessing
        self.output_dir = Path(output_dir)
        self.suffixes = list(dict.fromkeys(SUFFIXES[f] for f in names))
        self.probability = probability
        self.reconstruction = reconstruction
        self.batch_size = max(1, int(batch_size))
        self.slice_range = as_range(slice_range, "slice_range")
        self.voxel_size_nm = as_voxel_size(voxel_size_nm)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.weights = str(weights) if weights is not None else None
        self.progress = progress
        self.distribute = distribute
        self.ood = ood if ood is not None and ood.enabled else None
        self.zarr_level = _level(zarr_level)
        self.overlap_io = as_bool(overlap_io, "overlap_io")

    # ----------------------------------------------------------------------------------- outputs
    def _outputs(self, stem: str) -> dict[str, list[Path]]:
        kinds = ["mask"]
        kinds += ["prob"] if self.probability else []
        kinds += ["recon"] if self.reconstruction else []
        kinds += ["uncertainty"] if self.predictor.tta else []
        return {k: [self.output_dir / f"{stem}_{k}{s}" for s in self.suffixes] for k in kinds}

    def _summary_path(self, stem: str) -> Path:
        return self.output_dir / f"{stem}_summary.json"

    def is_complete(self, path: Path) -> bool:
        stem = volume_stem(path)
        paths = [p for ps in self._outputs(stem).values() for p in ps] + [self._summary_path(stem)]
        return all(volume_exists(p) for p in paths)  # OME-Zarr outputs are folders

    def _lock_path(self, path: Path) -> Path:
        return self.output_dir / f".{volume_stem(path)}.lock"

    def _remove_stale_partials(self, stem: str) -> None:
        # Left by a process that was killed (SIGKILL gives no chance to clean up). Called only while
        # holding the tomogram's lock, so no live run owns them. The pattern is exact: the partials
        # of "a" must not match those of "a_b".
        kinds = "|".join((*KINDS, "summary"))
        own = re.compile(rf"\.{re.escape(stem)}_({kinds}){re.escape(PARTIAL_MARKER)}")
        for stale in self.output_dir.iterdir():
            if own.match(stale.name):
                remove_output(stale)  # a file, or an OME-Zarr folder

    def _space_needed(self, volume: Volume, outputs: dict[str, list[Path]], world: int) -> int:
        """Peak bytes the outputs of ``volume`` take in the output folder, temporary files included."""
        shape = volume.data.shape
        needed = sum(bytes_to_write(p, shape, self._dtype(k)) for k, paths in outputs.items() for p in paths)
        voxels = int(np.prod(shape))
        if world > 1:  # one raw file per kind, shared by the ranks
            needed += sum(voxels * self._dtype(kind).itemsize for kind in outputs)
        elif self.post.needs_volume:  # the staged raw mask
            needed += voxels
        return needed

    def _check_space(self, volume: Volume, outputs: dict[str, list[Path]], world: int) -> None:
        needed = self._space_needed(volume, outputs, world)
        check_free_space(self.output_dir, needed, f"the outputs of {volume.path}")

    # ------------------------------------------------------------------------------ one tomogram
    def segment(self, path: str | os.PathLike, rank: int = 0, world: int = 1) -> dict | None:
        """Segment one tomogram and return its summary.

        With ``world`` > 1 every rank calls this and the ranks share the tomogram's slices; rank 0
        writes the outputs and returns the summary, the other ranks return None.
        """
        start = time.perf_counter()
        volume = _open_on_all_ranks(path, self.voxel_size_nm, world, self.zarr_level)
        match = self.predictor.voxel_match(volume.voxel_size_nm, volume.path.name)
        stem = volume_stem(volume.path)
        depth = volume.data.shape[0]
        z0, z1 = slice_bounds(self.slice_range, depth, volume.path)
        outputs = self._outputs(stem)
        if world > 1:
            foreground = self._segment_shared(volume, stem, outputs, (z0, z1), rank, world, match)
            if rank != 0:
                return None
        else:
            self._remove_stale_partials(stem)
            self._check_space(volume, outputs, world)
            with ExitStack() as stack:
                writers = {
                    kind: [stack.enter_context(self._writer(p, volume, kind)) for p in paths]
                    for kind, paths in outputs.items()
                    if kind != "mask" or not self.post.needs_volume
                }
                staged = self._staging(stack, volume, stem) if self.post.needs_volume else None
                if staged is not None:
                    writers["mask"] = [ArraySink(staged)]
                foreground = self._segment_range(volume, writers, (z0, z1), (0, depth), match)
                if staged is not None:
                    self.post.volume(staged)
                    foreground = self._copy_staged(staged, outputs["mask"], volume, "mask", stack)
        ood = self._ood(volume, (z0, z1), match) if self.ood is not None else None
        summary = {
            "tomogram": str(volume.path),
            "shape": list(volume.data.shape),
            "dtype": str(volume.data.dtype),
            "voxel_size_nm": list(volume.voxel_size_nm) if volume.voxel_size_nm else None,
            "slices_segmented": [z0, z1],
            "threshold": self.post.threshold,
            "foreground_fraction": foreground / float(np.prod(volume.data.shape)),
            "seconds": round(time.perf_counter() - start, 3),
            "weights": self.weights,
            "device": str(self.predictor.device),
            "ranks": world,
            "tta": self.predictor.tta,
            "tta_polarity": self.predictor.tta_polarity,
            "voxel_matching": match.summary(),
            "postprocessing": {
                "erosion_iterations": self.post.erosion_iterations,
                "border_crop": self.post.border_crop,
                "min_object_voxels": self.post.min_object_voxels,
            },
            "outputs": {k: [p.name for p in ps] for k, ps in outputs.items()},
        }
        if ood is not None:
            summary["ood"] = ood
        with atomic_output(self._summary_path(stem)) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        return summary

    def _ood(self, volume: Volume, z_range: tuple[int, int], match: VoxelMatch | None) -> dict:
        """The OOD score of the segmented slices (as the network saw them); warns when flagged."""
        scale = match.scale if match is not None and match.resampled else None
        result = self.ood.score(volume.data, *z_range, scale=scale)
        if result["flagged"]:
            logger.warning(ood_warning(volume.path.name, result))
        return result

    def _segment_shared(
        self,
        volume: Volume,
        stem: str,
        outputs: dict,
        z_range: tuple[int, int],
        rank: int,
        world: int,
        match: VoxelMatch | None = None,
    ) -> int:
        """All ranks predict their part of ``z_range`` into shared raw files; rank 0 writes the outputs.

        Returns the foreground voxel count on rank 0 (0 elsewhere). Every step ends with a reduction over
        the ranks, so an error on one rank stops all of them at the same point instead of hanging them.
        """
        raws = {kind: self.output_dir / f".{stem}_{kind}{PARTIAL_MARKER}shared.raw" for kind in outputs}
        shape = volume.data.shape
        staged: dict[str, np.memmap] = {}
        with ExitStack() as stack:

            def create_raw_files() -> None:
                if rank == 0:
                    self._remove_stale_partials(stem)
                    self._check_space(volume, outputs, world)
                    for kind, raw in raws.items():
                        stack.callback(raw.unlink, missing_ok=True)
                        what = f"the {kind} of {volume.path.name}"
                        new_memmap(raw, self._dtype(kind), shape, what)  # zeros, mapped by every rank below

            def predict_my_part() -> None:
                for kind, raw in raws.items():
                    staged[kind] = np.memmap(raw, dtype=self._dtype(kind), mode="r+", shape=shape)
                writers = {kind: [ArraySink(array)] for kind, array in staged.items()}
                part = share_range(*z_range, rank, world, multiple=self.batch_size)
                self._segment_range(volume, writers, z_range, part, match)

            _on_all_ranks(create_raw_files, volume.path)
            _on_all_ranks(predict_my_part, volume.path)
            foreground = 0

            def write_outputs() -> None:
                nonlocal foreground
                self.post.volume(staged["mask"])
                with ExitStack() as writers:  # closed (renamed into place) before the others go on
                    for kind, paths in outputs.items():
                        count = self._copy_staged(staged[kind], paths, volume, kind, writers)
                        foreground = count if kind == "mask" else foreground

            _on_all_ranks(write_outputs if rank == 0 else lambda: None, volume.path)
        return foreground

    def _dtype(self, kind: str) -> np.dtype:
        return output_dtype(kind, self.probability)

    def _writer(self, path: Path, volume: Volume, kind: str) -> SliceWriter:
        dtype = self._dtype(kind)
        return SliceWriter(path, volume.data.shape, dtype, voxel_size_nm=volume.voxel_size_nm, like=volume)

    def _staging(self, stack: ExitStack, volume: Volume, stem: str) -> np.memmap:
        # The raw mask waits on disk for whole-volume clean-up, so memory does not grow with depth.
        raw = self.output_dir / f".{stem}_mask{PARTIAL_MARKER}{secrets.token_hex(4)}.raw"
        stack.callback(raw.unlink, missing_ok=True)
        return new_memmap(raw, np.uint8, volume.data.shape, f"the staged mask of {volume.path.name}")

    def _segment_range(
        self,
        volume: Volume,
        writers: dict,
        z_range: tuple[int, int],
        extent: tuple[int, int],
        match: VoxelMatch | None = None,
    ) -> int:
        """Segment ``z_range`` and write the slices of ``extent`` (zeros outside the range)."""
        return segment_volume(
            volume.data, self.predictor, self.post, writers, z_range, extent=extent,
            batch_size=self.batch_size, probability=self.probability,
            progress=volume.path.name if self.progress else None, voxel_match=match,
            overlap_io=self.overlap_io,
        )  # fmt: skip

    def _copy_staged(self, staged: np.memmap, paths: list[Path], volume: Volume, kind: str, stack: ExitStack) -> int:
        """Stream a staged raw volume into its output files; returns its sum (the mask's foreground)."""
        writers = [stack.enter_context(self._writer(p, volume, kind)) for p in paths]
        total = 0
        for start in range(0, staged.shape[0], self.batch_size):
            block = np.asarray(staged[start : start + self.batch_size])
            total += int(block.sum(dtype=np.int64)) if kind == "mask" else 0
            for writer in writers:
                writer.write(start, block)
            release_pages(staged[start : start + self.batch_size])
        return total

    # ---------------------------------------------------------------------------------- a folder
    def run(self, tomograms: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
        """Segment a folder of tomograms (or a list of files); with torchrun, ranks share the work.

        Unreadable tomograms are reported by name and skipped; :class:`InferenceError` is raised at the
        end if any failed, after the others are done. A tomogram that another run is writing into the
        same output folder is left to the end, then waited for.
        """
        rank, world = join()
        output_folder(self.output_dir)
        if isinstance(tomograms, (str, os.PathLike)):
            paths = find_volumes(tomograms)
        else:
            paths = [Path(p) for p in tomograms]
        share_slices = world > 1 and (self.distribute == "slices" or (self.distribute == "auto" and len(paths) < world))
        mine, ranks = (paths, (rank, world)) if share_slices else (paths[rank::world], (0, 1))
        logger.info(
            "segmenting %d of %d tomograms from %s on %s (rank %d/%d, sharing %s), weights %s",
            len(mine),
            len(paths),
            paths[0].parent if paths else "(none)",
            self.predictor.device,
            rank,
            world,
            "slices" if share_slices else "tomograms",
            self.weights,
        )
        started = time.time()
        summaries: list[dict] = []
        failures: list[str] = []
        busy: list[Path] = []
        for path in mine:
            if not self.overwrite and self.is_complete(path):
                logger.info("%s: outputs complete, skipped (set overwrite to redo)", path.name)
                summaries.append(json.loads(self._summary_path(volume_stem(path)).read_text()))
                continue
            if share_slices:  # the ranks go through the tomograms in step: rank 0 waits for the lock
                with FileLock(self._lock_path(path)) if rank == 0 else nullcontext():
                    self._segment_one(path, ranks, summaries, failures)
                continue
            lock = FileLock(self._lock_path(path))
            if not lock.acquire(blocking=False):
                logger.warning(
                    "%s: another run is writing its outputs into %s; coming back to it at the end",
                    path.name,
                    self.output_dir,
                )
                busy.append(path)
                continue
            with lock:
                self._segment_unless_done(path, started, summaries, failures)
        for path in busy:
            logger.info("%s: waiting for the other run to finish it", path.name)
            with FileLock(self._lock_path(path)):
                self._segment_unless_done(path, started, summaries, failures)
        # When ranks share slices every rank saw every failure: count them once.
        failed = sum_over_ranks(len(failures) if rank == 0 or not share_slices else 0)
        if rank == 0:
            self._write_table(paths)  # after the reduction above: every rank is done
        leave()
        if failures or failed:
            raise InferenceError(f"{failed} tomogram(s) failed: " + "; ".join(failures))
        return summaries

    def _segment_unless_done(self, path: Path, started: float, summaries: list, failures: list) -> None:
        """Under the tomogram's lock: segment it, unless another run completed it meanwhile."""
        summary_path = self._summary_path(volume_stem(path))
        if self.is_complete(path) and (not self.overwrite or summary_path.stat().st_mtime >= started):
            logger.info("%s: outputs complete (written by another run)", path.name)
            summaries.append(json.loads(summary_path.read_text()))
            return
        self._segment_one(path, (0, 1), summaries, failures)

    def _segment_one(self, path: Path, ranks: tuple[int, int], summaries: list, failures: list) -> None:
        try:
            summary = self.segment(path, *ranks)
        except (VolumeError, OSError, ValueError) as err:
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            logger.error(message)
            failures.append(message)
            return
        if summary is None:  # another rank wrote this tomogram's outputs
            return
        summaries.append(summary)
        logger.info(
            "%s: %d slices in %.1f s, foreground %.4f",
            path.name,
            summary["shape"][0],
            summary["seconds"],
            summary["foreground_fraction"],
        )

    def _write_table(self, paths: list[Path]) -> None:
        rows = []
        for path in paths:
            summary_path = self._summary_path(volume_stem(path))
            if summary_path.is_file():
                s = json.loads(summary_path.read_text())
                rows.append(
                    {
                        "tomogram": Path(s["tomogram"]).name,
                        "slices": s["shape"][0],
                        "height": s["shape"][1],
                        "width": s["shape"][2],
                        "voxel_size_nm": "x".join(f"{v:g}" for v in s["voxel_size_nm"]) if s["voxel_size_nm"] else "",
                        "threshold": s["threshold"],
                        "foreground_fraction": f"{s['foreground_fraction']:.6f}",
                        "seconds": s["seconds"],
                        "weights": s["weights"],
                        "ood_score": _blank(s.get("ood", {}).get("score")),
                        "ood_ratio": _blank(s.get("ood", {}).get("ratio")),
                    }
                )
        if not rows:
            return
        with atomic_output(self.output_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _blank(value: object) -> object:
    return "" if value is None else value


def _on_all_ranks(step, path: Path) -> None:
    """Run ``step`` on this rank, then stop every rank with an error if it failed on any of them."""
    error: Exception | None = None
    try:
        step()
    except (VolumeError, OSError, ValueError) as err:
        error = err
    failed = sum_over_ranks(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise VolumeError(f"{path}: segmentation failed on {failed} other rank(s); see their log")


def _open_on_all_ranks(path: str | os.PathLike, voxel_size_nm, world: int, level: int = 0) -> Volume:
    if world == 1:
        return open_volume(path, voxel_size_nm=voxel_size_nm, level=level)
    opened: list[Volume] = []
    _on_all_ranks(lambda: opened.append(open_volume(path, voxel_size_nm=voxel_size_nm, level=level)), Path(path))
    return opened[0]


def _level(value: object) -> int:
    """``zarr_level`` as a whole number >= 0 (it may arrive as a string from the command line)."""
    try:
        level = int(str(value).strip())
    except ValueError:
        level = -1
    if isinstance(value, bool) or level < 0:
        raise ValueError(f"zarr_level must be a whole number >= 0 (0: the highest resolution), got {value!r}")
    return level
