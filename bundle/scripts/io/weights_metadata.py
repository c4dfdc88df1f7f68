"""What a weights file was trained on, in a JSON sidecar beside it: ``model.pt`` -> ``model.pt.json``.

Why a sidecar and not a key inside the checkpoint: the bundle's weights are plain state dicts (the
shipped ``models/model.pt``, the converted published weights, what MONAI Label publishes) that
MONAI's ``CheckpointLoader`` and ``ckpt_export`` read as they are. The sidecar is JSON, read as data
only. It lives in ``io`` because training (which never imports the network package) writes it and
the network's ``weights_info`` reads it. Its name keeps the weights file's full name, so ``w.pt``
and ``w.h5`` never share one, and it ends in ``.json``, so MONAI Label's ``models/*.pt`` listing
never shows it.

The sidecar records the SHA-256 of the weights it describes; a sidecar left beside other weights (a
file replaced by hand or uploaded) is ignored with a warning rather than believed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scripts.io.atomic import atomic_output

__all__ = [
    "PUBLISHED_RECIPE",
    "PUBLISHED_VOXEL_SIZE_NM",
    "MetadataError",
    "WeightsMetadata",
    "file_sha256",
    "metadata_path",
    "read_metadata",
    "write_metadata",
]

logger = logging.getLogger(__name__)

METADATA_SUFFIX = ".json"
# The published network (Dyhr, Sadeghi et al. 2023) was trained on 9.8 nm tomograms.
PUBLISHED_VOXEL_SIZE_NM = 9.8
PUBLISHED_RECIPE = "published"
_TEXT_KEYS = ("recipe", "trained_on", "dataset", "date", "sha256", "weights", "init_weights", "adapted_to")


class MetadataError(ValueError):
    """A sidecar that is not valid JSON or holds values of the wrong type; the message names it."""


@dataclass(frozen=True)
class WeightsMetadata:
    """The sidecar's content. Every field may be unknown (None)."""

    width: int | None = None
    voxel_size_nm: float | None = None
    recipe: str | None = None
    trained_on: str | None = None
    dataset: str | None = None
    date: str | None = None
    init_weights: str | None = None  # the weights training started from: "NAME (sha256 PREFIX)"
    adapted_to: str | None = None  # the unlabeled data of an adaptation (``adapting``)
    # The image decoder's median reconstruction error on the training data (scripts.infer.ood).
    ood_level: float | None = None


def metadata_path(weights: str | os.PathLike) -> Path:
    """The sidecar of ``weights``: the same name with ``.json`` appended."""
    weights = Path(weights)
    return weights.with_name(weights.name + METADATA_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise MetadataError(f"{path}: weights metadata must be a JSON object, got {type(raw).__name__}")
    width = raw.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise MetadataError(f"{path}: 'width' must be a positive integer, got {width!r}")
    for key in ("voxel_size_nm", "ood_level"):
        value = raw.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value) and value > 0):
            raise MetadataError(f"{path}: {key!r} must be a positive number or null, got {value!r}")
    for key in _TEXT_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise MetadataError(f"{path}: {key!r} must be text or null, got {raw[key]!r}")
    return raw


def read_metadata(weights: str | os.PathLike, width: int | None = None) -> WeightsMetadata | None:
    """The sidecar of ``weights``, or None when there is none or it describes other weights.

    A sidecar whose ``sha256`` (when it has one) or ``width`` (when ``width`` is given) does not match
    the weights is ignored with a warning. MetadataError for a sidecar that does not parse.
    """
    weights = Path(weights)
    path = metadata_path(weights)
    if not path.is_file():
        return None
    try:
        raw = _checked(json.loads(path.read_text()), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetadataError(f"{path}: cannot read the weights metadata ({err})") from err
    if raw.get("sha256") and raw["sha256"] != file_sha256(weights):
        logger.warning("%s describes other weights than %s (SHA-256 differs): ignored", path, weights.name)
        return None
    if width is not None and raw.get("width") is not None and raw["width"] != width:
        logger.warning("%s says width %s, %s has width %d: ignored", path, raw["width"], weights.name, width)
        return None
    voxel, level = raw.get("voxel_size_nm"), raw.get("ood_level")
    return WeightsMetadata(
        width=raw.get("width"),
        voxel_size_nm=float(voxel) if voxel is not None else None,
        recipe=raw.get("recipe"),
        trained_on=raw.get("trained_on"),
        dataset=raw.get("dataset"),
        date=raw.get("date"),
        init_weights=raw.get("init_weights"),
        adapted_to=raw.get("adapted_to"),
        ood_level=float(level) if level is not None else None,
    )


def write_metadata(weights: str | os.PathLike, metadata: WeightsMetadata) -> Path:
    """Write the sidecar of the (existing) ``weights`` file atomically, with its SHA-256; returns it."""
    weights = Path(weights)
    content = {
        "weights": weights.name,
        "sha256": file_sha256(weights),
        "width": metadata.width,
        "voxel_size_nm": metadata.voxel_size_nm,
        "recipe": metadata.recipe,
        "trained_on": metadata.trained_on,
        "dataset": metadata.dataset,
        "init_weights": metadata.init_weights,
        "adapted_to": metadata.adapted_to,
        "ood_level": metadata.ood_level,
        "date": metadata.date or datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    path = metadata_path(weights)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    return path
