"""The human-facing files of a BioImage Model Zoo package: its README and its cover picture.

Kept apart from the packaging (``scripts.network.bioimageio``) so that the wording and the picture can
change without touching the model description.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["CardFacts", "write_cover", "write_readme"]


@dataclass(frozen=True)
class CardFacts:
    """The numbers the README states, taken from the export itself."""

    weights_name: str
    width: int
    voxel_size_nm: float
    halo: int
    min_size: int
    recipe: str | None
    trained_on: str | None
    test_slice: str
    doi: str


_README = """# Cryo-SXT membrane segmentation (semi-supervised double decoder)

Segments membranes in single slices of cryo-soft X-ray tomograms (cryo-SXT). The network is the
semi-supervised double-decoder network of Dyhr, Sadeghi et al., PNAS 2023 (doi {doi}), exported from
the weights `{weights_name}` (width {width}) of the cryo-SXT membrane segmentation MONAI bundle.
Only the label branch is exported; the image-reconstruction branch is used in training.

## Input

One 2D slice, axes (batch, channel, y, x), one channel, float32, in any intensity unit. The model
standardises each slice on its own (preprocessing `zero_mean_unit_variance` over channel, y and x),
as the bundle does. Height and width: at least {min_size} pixels, in steps of 16 (the network pools
four times by 2). The weights were trained at {voxel_size_nm:g} nm per pixel (the axes state it in
whole picometres, which keeps the zoo tools' size arithmetic exact); resample tomograms of another
voxel size to it first (the bundle does this itself with `match_voxel_size`).

## Output

The label branch: tanh, in [-1, 1], same size as the input. **Threshold at 0**: values above 0 are
membrane. There is no post-processing step; `(output + 1) / 2` reads as a score in [0, 1] with the
threshold at 0.5.

## Halo and tiling

The output declares a halo of {halo} pixels per side: a consumer that tiles a large slice should run
tiles that overlap by that much and discard the outer {halo} pixels of each tile. The bundle measured
it with its shipped weights on simulated slices: tiles with 96 pixels of context gave the masks of the
whole slice, 64 pixels changed about 0.4 % of the mask pixels and 32 pixels about 2 %. Slices up to a
few thousand pixels fit in memory at once; run them whole where you can.

## Validation

The package's test input is {test_slice}; `bioimageio test` reproduces the test output with every
weights format (PyTorch state dict, TorchScript, ONNX). The bundle's test suite checks that this
package, run by bioimageio.core on a whole simulated slice, gives the bundle's own masks at
threshold 0, and its values to 1e-4 on slices stored in integer-like units. On slices in 1/um
(standard deviation ~0.1) values differ by up to about 2e-4: the standard preprocessing adds 1e-6 to the
standard deviation, the bundle does not. Accuracy figures of these weights on held-out simulated
tomograms are in the bundle's documentation (`docs/accuracy.md`); training recipe: {recipe}; training
data: {trained_on}. Check masks by eye before drawing conclusions: these weights were trained on
simulated data.

## Citation

Dyhr, Sadeghi et al. 3D-surface reconstruction of cellular cryo-soft X-ray microscopy tomograms
using semi-supervised deep learning. PNAS 120(24), e2209938120 (2023). doi:{doi}
"""


def write_readme(path: str | os.PathLike, facts: CardFacts) -> None:
    """The package's README.md (bioimageio expects a ``Validation`` section)."""
    text = _README.format(
        doi=facts.doi, weights_name=facts.weights_name, width=facts.width, min_size=facts.min_size,
        voxel_size_nm=facts.voxel_size_nm, halo=facts.halo, test_slice=facts.test_slice,
        recipe=facts.recipe or "unknown", trained_on=facts.trained_on or "unknown",
    )  # fmt: skip
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _grey(image: np.ndarray) -> np.ndarray:
    # Percentile stretch: a few bright fiducials would otherwise leave the cell black.
    low, high = np.percentile(image, [1, 99])
    scaled = (image.astype(np.float64) - low) / max(float(high - low), 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def write_cover(path: str | os.PathLike, image: np.ndarray, label: np.ndarray) -> None:
    """A PNG of the slice (left) and its mask at threshold 0 (right): 2:1, as the model zoo asks."""
    import imageio.v3 as iio  # comes with scikit-image; writes PNG without a plotting library

    left = _grey(image)
    right = np.where(label > 0, 255, 0).astype(np.uint8)
    iio.imwrite(path, np.concatenate([left, right], axis=1), extension=".png")
