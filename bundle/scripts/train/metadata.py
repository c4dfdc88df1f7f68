"""Training writes, beside each checkpoint, what the weights were trained on (``NAME.pt.json``).

Inference resamples a tomogram whose voxel size differs from the training voxel size
(``scripts.infer.resample``), so the weights must say it: the median in-plane voxel size of the
labeled training images (the images the label decoder learnt membranes from), the width, the recipe
and the dataset. The sidecar is rewritten whenever its checkpoint changes, after the handlers that
save them (MONAI's ``CheckpointSaver`` for ``model.pt``, ``LastCheckpoint`` for ``last.pt``).

Given the network, the sidecar also gets ``ood_level``: the image decoder's median reconstruction
error (``scripts.reconstruction``) on a fixed sample of training slices, measured on the network's state
when the checkpoint was written. Inference compares each tomogram's score with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from scripts.io.volume import VolumeError, open_volume
from scripts.io.weights_metadata import (
    MetadataError,
    WeightsMetadata,
    file_sha256,
    read_metadata,
    write_metadata,
)
from scripts.reconstruction import EDGE_FRACTION, MIN_SIDE, reconstruction_error
from torch import nn

__all__ = ["WeightsMetadataWriter", "median_voxel_size"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "reference"
OOD_SLICES = 16  # training slices the OOD level is measured on
OOD_SEED = 0


def median_voxel_size(images: Sequence[str | os.PathLike]) -> float | None:
    """Median in-plane voxel size (nm, mean of y and x) over the headers of ``images``; None when no
    header has one."""
    sizes = []
    for image in dict.fromkeys(str(p) for p in images):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unknown voxel size is simply left out
                voxel = open_volume(image, allow_2d=True, check_finite=False).voxel_size_nm
        except VolumeError as err:
            logger.warning("voxel size of %s unknown: %s", image, err)
            continue
        if voxel is not None:
            sizes.append((voxel[1] + voxel[2]) / 2.0)
    return round(statistics.median(sizes), 4) if sizes else None


class WeightsMetadataWriter:
    """Trainer handler: keep ``save_dir/NAME.json`` beside each of ``filenames`` up to date.

    Args:
        save_dir: the run's output folder.
        data: the config's ``data_split`` (``train``, ``val``, ``unlabeled`` slice items).
        dataset_dir: the training folder (its name is recorded).
        width: the network width.
        recipe: the training recipe's name (train.json's ``recipe``).
        init_weights: the weights training started from (train.json's ``init_weights``), or None.
        adapted_to: the folder of unlabeled tomograms an adaptation used (adapt.json), or None.
        filenames: the checkpoints to describe.
        network: the network being trained; when given, the sidecars of ``ood_files`` also get its
            ``ood_level`` (median reconstruction error on up to 16 fixed training slices).
        ood_files: the weights inference reads; ``last.pt`` (rewritten every epoch) is left out:
            at width 64 on a CPU the level costs minutes.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        data: Mapping[str, Sequence[Mapping[str, Any]]],
        dataset_dir: str | os.PathLike,
        width: int,
        recipe: str | None = DEFAULT_RECIPE,
        init_weights: str | os.PathLike | None = None,
        adapted_to: str | os.PathLike | None = None,
        filenames: Sequence[str] = ("model.pt", "last.pt"),
        network: nn.Module | None = None,
        ood_files: Sequence[str] = ("model.pt", "adapted.pt"),
    ) -> None:
        self.save_dir = Path(save_dir)
        self.data = data
        self.dataset_dir = Path(dataset_dir)
        self.width = int(width)
        self.recipe = str(recipe) if recipe else DEFAULT_RECIPE
        self.filenames = tuple(filenames)
        self.init_weights = None
        if init_weights not in (None, "", "null", "None"):  # a missing file failed when the network loaded
            init = Path(init_weights)
            self.init_weights = f"{init.name} (sha256 {file_sha256(init)[:16]})"
        given = adapted_to not in (None, "", "null", "None")
        self.adapted_to = str(Path(adapted_to).resolve()) if given else None
        self.network = getattr(network, "module", network)  # DistributedDataParallel's wrapped network
        self.ood_files = frozenset(ood_files)
        self._metadata: WeightsMetadata | None = None
        self._ood_sample: list[tuple[str, int]] | None = None
        # Checkpoints already there (a resumed run): until saved again they are not the network's state.
        self._before = {name: self._stamp(self.save_dir / name) for name in self.filenames}
        self._written: dict[str, tuple[int, int]] = {}  # file -> (mtime_ns, size) its sidecar describes

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    @property
    def metadata(self) -> WeightsMetadata:
        if self._metadata is None:
            unlabeled = {str(item["image"]) for item in self.data.get("unlabeled", [])}
            # Adaptation's pseudo-labeled slices are of the unlabeled tomograms: counted there only.
            labeled = [
                item["image"]
                for key in ("train", "val")
                for item in self.data.get(key, [])
                if str(item["image"]) not in unlabeled
            ]
            voxel = median_voxel_size(labeled)
            dataset = self.dataset_dir.resolve().name
            trained_on = (
                f"{len(set(map(str, labeled)))} labeled and {len(unlabeled)} unlabeled tomograms "
                f"in {dataset!r}, median voxel {voxel} nm"
            )
            if self.init_weights:
                trained_on += f", starting from {self.init_weights}"
            adapted_to = None
            if self.adapted_to:
                adapted_to = f"{len(unlabeled)} unlabeled tomograms in {self.adapted_to}"
                if self.data.get("pseudo_labeled"):
                    adapted_to += f" (self-trained on pseudo labels of {self.data['pseudo_labeled']} slices)"
                trained_on = f"adapted to {adapted_to}; labeled source: {trained_on}"
            self._metadata = WeightsMetadata(
                self.width,
                voxel,
                self.recipe,
                trained_on,
                dataset,
                init_weights=self.init_weights,
                adapted_to=adapted_to,
            )
        return self._metadata

    def ood_sample(self) -> list[tuple[str, int]]:
        """(image, z) of up to 16 training slices (labeled train + unlabeled), drawn once with a fixed
        seed; unlabeled slices in the outer 10 % of their tomogram are left out, as inference does."""
        if self._ood_sample is None:
            unlabeled = list(self.data.get("unlabeled", []))
            depth: dict[str, int] = {}
            for item in unlabeled:
                depth[str(item["image"])] = max(depth.get(str(item["image"]), 0), int(item["z"]) + 1)

            def inner(item: Mapping[str, Any]) -> bool:
                n = depth[str(item["image"])]
                skip = int(n * EDGE_FRACTION)
                return skip <= int(item["z"]) < n - skip

            items = [(str(it["image"]), int(it["z"])) for it in self.data.get("train", [])]
            items += [(str(it["image"]), int(it["z"])) for it in unlabeled if inner(it)]
            picked = random.Random(OOD_SEED).sample(items, min(OOD_SLICES, len(items)))
            self._ood_sample = sorted(picked)
        return self._ood_sample

    def ood_level(self) -> float | None:
        """The network's median reconstruction error on :meth:`ood_sample`; None without slices."""
        errors = []
        volumes: dict[str, Any] = {}
        for image, z in self.ood_sample():
            try:
                if image not in volumes:
                    volumes[image] = open_volume(image, allow_2d=True, check_finite=False).data
                one = volumes[image][z]
            except VolumeError as err:
                logger.warning("OOD level: %s left out (%s)", image, err)
                continue
            if min(one.shape) >= MIN_SIDE:
                errors.extend(reconstruction_error(self.network, one[None]))
        if not errors:
            return None
        level = round(float(statistics.median(errors)), 6)
        return level if level > 0 else None

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _level_of(self, name: str, measured: list[float | None]) -> float | None:
        path = self.save_dir / name
        if self._stamp(path) == self._before.get(name):  # not saved by this run: keep its own level
            try:
                old = read_metadata(path)
            except MetadataError:
                return None
            return old.ood_level if old is not None else None
        if not measured:  # at most once per call: both checkpoints hold the same network state
            measured.append(self.ood_level())
        return measured[0]

    def __call__(self, engine: Engine | None = None) -> None:
        measured: list[float | None] = []
        for name in self.filenames:
            path = self.save_dir / name
            stamp = self._stamp(path)
            if stamp is None:
                continue
            if self._written.get(name) != stamp:
                metadata = self.metadata
                if self.network is not None and name in self.ood_files:
                    metadata = dataclasses.replace(metadata, ood_level=self._level_of(name, measured))
                write_metadata(path, metadata)
                self._written[name] = stamp
