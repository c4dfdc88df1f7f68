"""Zero-label adaptation to a new microscope: the ``adapting`` workflow (``configs/adapt.json``).

The double-decoder's unlabeled step teaches the encoder what a dataset looks like; this workflow
points it at a user's unlabeled tomograms from a new instrument while labeled steps keep the
segmentation anchored on source data the user need not have: by default a small labeled set is
simulated here (the simulator's ``random`` instrument, the shipped weights' own distribution).
What it adds to ``training``: the source data on demand, the user's folder as the unlabeled set,
the final weights as ``adapted.pt`` (model selection on *source* validation slices says nothing
about the new instrument) and a before/after report on the user's data: the image decoder's
reconstruction error (``scripts.infer.ood``) and, with a few labeled slices of the new data
(``check_dir``), Dice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from scripts.io.atomic import atomic_output
from scripts.io.volume import VolumeError, find_volumes, open_volume
from scripts.network.fusion import fuse_for_inference
from scripts.options import as_bool
from scripts.reconstruction import pick_slices, reconstruction_error
from scripts.train.dataset import list_training_data, slice_items, slice_items_unlabeled
from scripts.train.labels import label_to_target
from scripts.train.metadata import WeightsMetadataWriter
from scripts.train.metrics import label_counts, label_scores
from scripts.train.pseudo_labels import DEFAULT_KEEP, INTERIOR, interior_slices, membrane_prior, write_pseudo_labels
from scripts.train.slices import VolumeCache
from scripts.train.workflow import prepare_data, standardise

__all__ = ["ADAPTED", "REPORT", "AdaptationReport", "adaptation_data", "source_dataset"]

logger = logging.getLogger(__name__)

ADAPTED = "adapted.pt"
REPORT = "adaptation_report.json"
SOURCE_FOLDER = "source_data"
SOURCE_SEED = 500  # training data use seeds < 1000, the benchmark's held-out tomograms 1000 and up
SOURCE_COUNT = 4
SOURCE_SHAPE = "32,256,256"


def _given(value: Any) -> bool:
    return value not in (None, "", "null", "None")


def source_dataset(
    output_dir: str | os.PathLike, count: int = SOURCE_COUNT, shape: str = SOURCE_SHAPE, seed: int = SOURCE_SEED
) -> str:
    """The default labeled source folder (adapt.json's ``dataset_dir`` unless the user gives one):
    ``count`` simulated tomograms (``random`` instrument and cell) in ``output_dir/source_data``,
    made once and reused."""
    folder = Path(output_dir) / SOURCE_FOLDER
    recipe = {
        "count": int(count),
        "shape": str(shape),
        "seed": int(seed),
        "instrument": "random",
        "cell": "random",
        "annotated": list(INTERIOR),
    }
    marker = folder / "source.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return str(folder)
    try:
        from cryosxt_sim.simulate import main as simulate
    except ImportError as err:
        raise ValueError(
            "adapting without --dataset_dir simulates its labeled source data and needs the "
            "simulator (pip install -e . from the repository); or pass --dataset_dir with "
            "labeled tomograms"
        ) from err
    logger.info("simulating %d labeled source tomograms (%s, seed %d) in %s", count, shape, seed, folder)
    names = simulate(out=str(folder), count=int(count), shape=shape, seed=int(seed), instrument="random", cell="random")
    depth = int(str(shape).split(",")[0])
    interior = interior_slices(depth)
    first, last = interior[0], interior[-1]
    for name in names:  # the top and bottom of a cell, weak under the missing wedge, stay unannotated
        with atomic_output(folder / "labels" / f"{name}.slices.txt") as tmp:
            tmp.write_text(f"{first}-{last}\n")
    with atomic_output(marker) as tmp:  # last: a complete source set
        tmp.write_text(json.dumps(recipe))
    return str(folder)


def adaptation_data(
    dataset_dir: str | os.PathLike,
    unlabeled_dir: str | os.PathLike | None,
    val_fraction: float = 0.25,
    seed: int = 0,
    semi_supervised: bool | str = True,
    pseudo_labels: bool | str = False,
    init_weights: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    pseudo_label_keep: float = DEFAULT_KEEP,
) -> dict[str, Any]:
    """``prepare_data`` of the labeled source folder, with the unlabeled slices of ``unlabeled_dir``
    (every volume in it: the new microscope's tomograms) instead of the source's own.

    With ``pseudo_labels`` the ``init_weights`` also label those tomograms (class-balanced, in
    ``output_dir``; ``scripts.train.pseudo_labels``) and their slices join the labeled training
    slices (never validation: it stays on source data). With ``semi_supervised`` false (the
    benchmark's supervised-only control) neither runs; the report still measures the tomograms of
    ``unlabeled_dir``."""
    if not _given(unlabeled_dir):
        raise ValueError("adapting needs --unlabeled_dir: a folder of tomograms from the new microscope")
    volumes = find_volumes(unlabeled_dir)
    data = prepare_data(dataset_dir, val_fraction, seed, semi_supervised=False)
    semi = as_bool(semi_supervised, "semi_supervised")
    data["unlabeled"] = slice_items_unlabeled(volumes) if semi else []
    logger.info("adapting to %d tomograms (%d slices) in %s", len(volumes), len(data["unlabeled"]), unlabeled_dir)
    if semi and as_bool(pseudo_labels, "pseudo_labels"):
        if not _given(init_weights) or not _given(output_dir):
            raise ValueError("pseudo_labels needs init_weights (the teacher) and output_dir")
        prior = membrane_prior([*data["train"], *data["val"]])  # the source's labeled slices
        pseudo = slice_items(write_pseudo_labels(init_weights, volumes, output_dir, prior, float(pseudo_label_keep)))
        data["train"] = [*data["train"], *pseudo]
        data["pseudo_labeled"] = len(pseudo)
    return data


def _tomogram_errors(network: torch.nn.Module, volumes: Sequence[Path], slices: int) -> dict[str, float]:
    """Median reconstruction error per tomogram (``scripts.infer.ood``), on ``slices`` slices each."""
    out = {}
    for path in volumes:
        volume = open_volume(path, check_finite=False)
        picked = pick_slices(volume.data.shape[0], 0, volume.data.shape[0], slices)
        stack = np.stack([np.asarray(volume.data[z], dtype=np.float32) for z in picked])
        out[path.name] = float(np.median(reconstruction_error(network, stack)))
    return out


@torch.no_grad()
def _dice(network: torch.nn.Module, items: Sequence[Mapping[str, Any]], device: torch.device) -> float:
    """Dice (tanh > 0) over the annotated pixels of ``items`` (slice items of labeled tomograms)."""
    counts = torch.zeros(7, dtype=torch.float64)
    volumes = VolumeCache(4)  # items come slice by slice: open each tomogram once
    for item in items:
        z = int(item["z"])
        image = standardise(np.asarray(volumes.get(str(item["image"])).data[z], np.float32))
        label_path = str(item["label"])
        target, mask = label_to_target(np.asarray(volumes.get(label_path).data[z]), label_path, z)
        out = network(torch.from_numpy(image)[None, None].to(device))
        label = out[0] if isinstance(out, tuple) else out
        counts += label_counts(
            label.cpu(), torch.from_numpy(target)[None, None], torch.from_numpy(mask)[None, None], threshold=0.0
        )
    return label_scores(counts)["dice"]


class AdaptationReport:
    """Trainer handler of ``adapting``: measures the network on the user's data when training starts
    and ends, saves the final network as ``adapted.pt`` (with its sidecar) and writes
    ``adaptation_report.json``.

    Args:
        network: the network being adapted (outputs "both").
        output_dir: the run's folder.
        unlabeled_dir: the new microscope's tomograms.
        check_dir: optional labeled tomograms of the new microscope (training layout); Dice before
            and after on their annotated slices.
        metadata: a ``WeightsMetadataWriter`` describing the adapted weights.
        slices: slices per tomogram for the reconstruction error.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        output_dir: str | os.PathLike,
        unlabeled_dir: str | os.PathLike,
        metadata: WeightsMetadataWriter,
        check_dir: str | os.PathLike | None = None,
        slices: int = 8,
    ) -> None:
        self.network = network
        self.output_dir = Path(output_dir)
        self.volumes = find_volumes(unlabeled_dir)
        self.unlabeled_dir = str(unlabeled_dir)
        self.metadata = metadata
        self.slices = int(slices)
        self.check_items: list[dict] = []
        if _given(check_dir):
            labeled, _ = list_training_data(check_dir)
            if not labeled:
                raise VolumeError(f"{check_dir}: no labeled tomogram to check the adaptation on")
            self.check_items = slice_items(labeled)
        self.check_dir = str(check_dir) if _given(check_dir) else None
        self.before: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _measure(self) -> dict[str, Any]:
        mode = self.network.training
        self.network.eval()
        try:
            # The fused inference copy of the network as it is now: several times faster on a CPU.
            network = getattr(self.network, "module", self.network)  # DistributedDataParallel's
            errors = _tomogram_errors(fuse_for_inference(network), self.volumes, self.slices)
            device = next(self.network.parameters()).device
            dice = _dice(self.network, self.check_items, device) if self.check_items else None
        finally:
            self.network.train(mode)
        median = float(np.median(list(errors.values())))
        return {"reconstruction_error": errors, "median_reconstruction_error": median, "dice": dice}

    def started(self, engine: Engine) -> None:
        # A resumed run keeps the "before" of its first start: the network is no longer the initial one.
        path = self.output_dir / REPORT
        if path.is_file():
            self.before = json.loads(path.read_text()).get("before")
        if self.before is None:
            self.before = self._measure()
            self._write({"before": self.before, "after": None})
        logger.info(
            "before adaptation: median reconstruction error %.4f%s",
            self.before["median_reconstruction_error"],
            f", Dice {self.before['dice']:.3f}" if self.before["dice"] is not None else "",
        )

    def completed(self, engine: Engine) -> None:
        weights = self.output_dir / ADAPTED
        with atomic_output(weights) as tmp:
            torch.save(self.network.state_dict(), tmp)
        self.metadata()  # its filenames: (adapted.pt,)
        after = self._measure()
        self._write(
            {"before": self.before, "after": after, "adapted_weights": str(weights), "epochs": engine.state.epoch}
        )
        b, a = self.before["median_reconstruction_error"], after["median_reconstruction_error"]
        line = f"adapted weights {weights}: median reconstruction error {b:.4f} -> {a:.4f}"
        if after["dice"] is not None:
            line += f", Dice on {self.check_dir} {self.before['dice']:.3f} -> {after['dice']:.3f}"
        logger.info(line)

    def _write(self, content: dict[str, Any]) -> None:
        report = {
            "unlabeled_dir": self.unlabeled_dir,
            "tomograms": [p.name for p in self.volumes],
            "check_dir": self.check_dir,
            "slices_per_tomogram": self.slices,
            **content,
        }
        with atomic_output(self.output_dir / REPORT) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
