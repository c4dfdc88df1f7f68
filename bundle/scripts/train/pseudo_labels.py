"""Class-balanced pseudo labels on a new microscope's tomograms: the self-training half of ``adapting``.

Why: weights taken to an instrument they never saw still *rank* membrane pixels well there (on the
benchmark's held-out instrument the shipped weights' output has a ROC AUC of 0.88-0.90 on two of
three tomograms) but put too few of them above the threshold: they under-segment, and the paper's
reconstruction steps, which adapt the encoder only, cannot move the segmentation decoder's
threshold. Here the starting weights (the teacher, averaged over the eight rot90/flip views) label
each slice of the user's tomograms by rank, per class: the top ``prior * keep`` of its pixels become
membrane, the bottom ``(1 - prior) * keep`` background, the rest stays not annotated (255) and has
no loss. ``prior`` is the membrane fraction of the labeled source data. This is class-balanced
self-training (Zou et al., ECCV 2018); ranking per slice instead of thresholding the teacher's
output is what corrects its bias. Only the interior of each tomogram is labeled (the outer slices
are weak under the missing wedge), as for the simulated source data.

The labels are written once per run (``OUTPUT/pseudo_labels``, crash-safe) and reused when the run
resumes with the same teacher and settings.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scripts.io.atomic import atomic_output
from scripts.io.labels import IGNORE_VALUE, MEMBRANE, canonical_labels
from scripts.io.volume import open_volume, volume_stem, write_volume
from scripts.io.weights_metadata import file_sha256
from scripts.network.dihedral import dihedral_mean
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import fuse_for_inference
from scripts.network.weights import load_weights, weights_info
from scripts.train.dataset import LabeledVolume
from scripts.train.workflow import standardise

__all__ = [
    "DEFAULT_KEEP",
    "INTERIOR",
    "class_balanced_labels",
    "interior_slices",
    "membrane_prior",
    "write_pseudo_labels",
]

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 0.5  # the confident half of each class is labeled, the other half left out
INTERIOR = (0.2, 0.8)  # the labeled part of each tomogram in z
FOLDER = "pseudo_labels"
BACKGROUND = 0


def interior_slices(depth: int) -> range:
    """The z indices that get labels: the interior 20-80 % (at least one slice). Also the annotated
    range of ``adapting``'s simulated source data (``scripts.train.adapt``)."""
    first = int(INTERIOR[0] * depth)
    return range(first, max(int(INTERIOR[1] * depth), first + 1))


def membrane_prior(items: Sequence[Mapping[str, Any]]) -> float:
    """Median membrane fraction of the annotated pixels per labeled tomogram, over the slices of
    ``items`` (``{"image", "label", "z"}`` slice items). ValueError when it is 0 or 1: no class
    balance to keep."""
    slices: dict[str, list[int]] = defaultdict(list)
    for item in items:
        slices[str(item["label"])].append(int(item["z"]))
    fractions = []
    for path, zs in slices.items():
        label = open_volume(path, allow_2d=True, check_finite=False).data
        values = canonical_labels(np.asarray(label[sorted(zs)]), path)  # int8 MRC: 255 reads as -1
        annotated = values != IGNORE_VALUE
        if annotated.any():
            fractions.append(float((values[annotated] == MEMBRANE).mean()))
    prior = float(np.median(fractions)) if fractions else 0.0
    if not 0.0 < prior < 1.0:
        folders = sorted({str(Path(p).parent) for p in slices}) or ["(none)"]
        raise ValueError(
            f"{', '.join(folders)}: membrane is {prior:.0%} of the annotated source pixels: no class balance "
            "for pseudo labels (run with --pseudo_labels false)"
        )
    return prior


def class_balanced_labels(soft: np.ndarray, prior: float, keep: float = DEFAULT_KEEP) -> np.ndarray:
    """Labels (uint8: membrane 1, background 0, not annotated 255) of one ``(H, W)`` teacher output.

    The ``prior * keep`` highest-scoring pixels are membrane, the ``(1 - prior) * keep`` lowest
    background; ties at a cut go to the class on their side of it.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"membrane prior must be in (0, 1), got {prior}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"pseudo_label_keep must be in (0, 1], got {keep}")
    order = np.argsort(soft, axis=None, kind="stable")
    n = order.size
    labels = np.full(n, IGNORE_VALUE, dtype=np.uint8)
    labels[order[: int((1.0 - prior) * keep * n)]] = BACKGROUND
    labels[order[n - int(prior * keep * n) :]] = MEMBRANE
    return labels.reshape(soft.shape)


def _teacher(weights: str | os.PathLike) -> torch.nn.Module:
    network = DoubleDecoderNet(weights_info(weights).width, outputs="label")
    # The fused inference copy: several times faster than the training network on a CPU.
    return fuse_for_inference(load_weights(network, weights).eval())


@torch.no_grad()
def _teacher_slice(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(standardise(np.asarray(image, dtype=np.float32)))[None, None]  # as training sees it
    return dihedral_mean(network, x)[0, 0].numpy()


def write_pseudo_labels(
    weights: str | os.PathLike,
    volumes: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    prior: float,
    keep: float = DEFAULT_KEEP,
) -> list[LabeledVolume]:
    """Label ``volumes`` with the teacher ``weights`` into ``output_dir/pseudo_labels``; returns them
    as labeled volumes for training (each image with its pseudo label volume)."""
    folder = Path(output_dir) / FOLDER
    recipe = {"teacher_sha256": file_sha256(weights), "prior": round(float(prior), 6), "keep": float(keep)}
    marker = folder / "pseudo_labels.json"
    targets = {Path(path): folder / f"{volume_stem(path)}.mrc" for path in volumes}
    reuse = marker.is_file() and json.loads(marker.read_text()) == recipe and all(t.is_file() for t in targets.values())
    network = None if reuse else _teacher(weights)
    labeled = []
    for path, target in targets.items():
        image = open_volume(path, check_finite=False)
        interior = interior_slices(image.shape[0])
        if not reuse:
            labels = np.full(image.shape, IGNORE_VALUE, dtype=np.uint8)
            for z in interior:
                labels[z] = class_balanced_labels(_teacher_slice(network, image.data[z]), prior, keep)
            write_volume(target, labels, like=image)
        labeled.append(LabeledVolume(path, target, list(interior)))  # every interior slice is labeled
    if not reuse:
        with atomic_output(marker) as tmp:  # last: every label volume of this recipe is complete
            tmp.write_text(json.dumps(recipe))
    logger.info(
        "%s pseudo labels: %d slices of %d tomograms in %s (membrane prior %.3f, keep %.2f)",
        "reused" if reuse else "wrote",
        sum(len(v.annotated_slices) for v in labeled),
        len(labeled),
        folder,
        prior,
        keep,
    )
    return labeled
