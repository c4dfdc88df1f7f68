"""Publish a training run's weights to ``models/``, where the inference task serves them.

Loaded with ``weights_only=True`` only: a checkpoint is data, and a pickle that names arbitrary
Python callables is refused rather than run. The bundle's ``last.pt`` holds state dicts (tensors,
numbers, strings, lists and tuples), which the restricted loader reads. The reading is the bundle's
own (``scripts.network.weights.read_state_dict``, the one reader of weights files); this module adds
what publishing needs on top: the metadata sidecar (``NAME.pt.json``: the voxel size the weights were
trained at, which inference resamples to) goes along with the weights. No MONAI Label import, so the
project's tests exercise it directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """A run that left no usable checkpoint."""


def network_state(path: Path) -> Mapping[str, Any]:
    """The network's state dict from a plain state dict or a checkpoint with a ``network`` entry."""
    from scripts.network.weights import WeightsError, read_state_dict

    try:
        state = read_state_dict(path)
    except WeightsError as err:  # its message starts with the path: said once, below
        reason = str(err).removeprefix(f"{path}: ")
        raise PublishError(f"{path}: not a plain checkpoint, not published: {reason}") from err
    if not state:
        raise PublishError(f"{path}: holds no network state dict, not published")
    return state


def publish_weights(run_dir: Path, target: Path) -> Path:
    """Copy the run's best model (else its last epoch) to ``target`` as a plain state dict, and its
    metadata sidecar to ``target``'s; return the source. ``target`` is replaced atomically or left
    as it was."""
    import torch
    from scripts.io.weights_metadata import MetadataError, metadata_path, read_metadata, write_metadata

    best, last = run_dir / "model.pt", run_dir / "last.pt"
    source = best if best.is_file() else last if last.is_file() else None
    if source is None:
        raise PublishError(f"training wrote no checkpoint in {run_dir} (model.pt or last.pt)")
    state = network_state(source)
    try:
        metadata = read_metadata(source)
    except MetadataError as err:  # the weights matter more: published without what they were trained on
        logger.warning("%s; %s is published without metadata", err, source.name)
        metadata = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not atomic_output: its temporary name ends in .pt and would be listed among models/*.pt.
    tmp = target.with_name(f".{target.name}.partial")
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, target)  # the inference task sees a complete file or the old one
    finally:
        tmp.unlink(missing_ok=True)
    # Re-written for the new file's SHA-256; a stale sidecar of the old weights must not stay behind
    # (it would be ignored, its SHA-256 differs, but it would mislead a reader).
    if metadata is not None:
        write_metadata(target, metadata)
    else:
        metadata_path(target).unlink(missing_ok=True)
    logger.info("published %s -> %s", source, target)
    return source
