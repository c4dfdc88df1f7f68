"""Training writes, beside each checkpoint, what the weights were trained on (``NAME.pt.json``).

Inference resamples a tomogram whose voxel size differs from the training voxel size
(``scripts.infer.resample``), so the weights must say it: the median in-plane voxel size of the
labeled training images (the images the label decoder learnt membranes from), the width, the recipe
and the dataset. The sidecar is rewritten whenever its checkpoint changes, after the handlers that
save them (MONAI's ``CheckpointSaver`` for ``model.pt``, ``LastCheckpoint`` for ``last.pt``).
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from scripts.io.volume import VolumeError, open_volume
from scripts.io.weights_metadata import WeightsMetadata, file_sha256, write_metadata

__all__ = ["WeightsMetadataWriter", "median_voxel_size"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "reference"


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
        self.adapted_to = None if adapted_to in (None, "", "null", "None") else str(Path(adapted_to).resolve())
        self._metadata: WeightsMetadata | None = None
        self._written: dict[str, tuple[int, int]] = {}  # file -> (mtime_ns, size) its sidecar describes

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    @property
    def metadata(self) -> WeightsMetadata:
        if self._metadata is None:
            labeled = [item["image"] for key in ("train", "val") for item in self.data.get(key, [])]
            unlabeled = {str(item["image"]) for item in self.data.get("unlabeled", [])}
            voxel = median_voxel_size(labeled)
            dataset = self.dataset_dir.resolve().name
            trained_on = (f"{len(set(map(str, labeled)))} labeled and {len(unlabeled)} unlabeled tomograms "
                          f"in {dataset!r}, median voxel {voxel} nm")
            if self.init_weights:
                trained_on += f", starting from {self.init_weights}"
            adapted_to = None
            if self.adapted_to:
                adapted_to = f"{len(unlabeled)} unlabeled tomograms in {self.adapted_to}"
                trained_on = f"adapted to {adapted_to}; labeled source: {trained_on}"
            self._metadata = WeightsMetadata(self.width, voxel, self.recipe, trained_on, dataset,
                                             init_weights=self.init_weights, adapted_to=adapted_to)
        return self._metadata

    def __call__(self, engine: Engine | None = None) -> None:
        for name in self.filenames:
            path = self.save_dir / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._written.get(name) != stamp:
                write_metadata(path, self.metadata)
                self._written[name] = stamp
