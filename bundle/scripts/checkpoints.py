"""Load network weights from any file the bundle produces or imports."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from scripts.keras_weights import KerasWeightsError, load_keras_weights
from scripts.networks import DoubleDecoderNet

__all__ = ["WeightsError", "load_weights"]

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or made for another network."""


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a foreign or truncated file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""  # torch adds pages of advice
        raise WeightsError(f"{path}: not a PyTorch weights file ({type(err).__name__}: {reason})") from err
    # MONAI's CheckpointSaver stores {"network": state_dict, "optimizer": ...}.
    if isinstance(payload, dict) and isinstance(payload.get("network"), dict):
        payload = payload["network"]
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: holds a {type(payload).__name__}, not a state dict")
    # Weights saved from a DistributedDataParallel wrapper carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in payload.items()}


def load_weights(net: DoubleDecoderNet, path: str | os.PathLike | None) -> DoubleDecoderNet:
    """Load ``path`` into ``net`` (in place) and return it.

    Accepts a plain state dict (``bundle/models/model.pt``), a MONAI checkpoint with a ``network``
    entry, or a Keras 2 ``.h5`` file of the published network. ``None`` keeps the initial weights.
    """
    if path is None:
        logger.warning("no weights file given: the network keeps its random initial weights")
        return net
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix.lower() in (".h5", ".hdf5"):
        try:
            load_keras_weights(net, path)
        except KerasWeightsError as err:
            raise WeightsError(str(err)) from err
    else:
        state = _state_dict(path)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsError(
                f"{path}: does not fit a width-{net.width} DoubleDecoderNet; check the 'width' setting "
                f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
            ) from err
    logger.info("loaded weights %s into a width-%d network", path, net.width)
    return net
