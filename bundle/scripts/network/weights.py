"""Weights files: what one holds (:func:`weights_info`), reading it once, loading it into a network.

The bundle reads two kinds: PyTorch state dicts it wrote itself (a plain state dict, or a MONAI
checkpoint with a ``network`` entry, maybe with DDP's ``module.`` prefix) and the published Keras 2
``.h5`` file. Everything that needs the network's width asks :func:`weights_info` rather than
trusting a config value, so a width-64 file loads without a matching ``--width``. What the weights
were trained on (voxel size, recipe) comes from a JSON sidecar beside them
(``scripts.io.weights_metadata``); Keras files without one are taken to be the published network
(9.8 nm).

CLI (from ``bundle/``): ``python -m scripts.network.weights IN.h5 OUT.pt [--width 64]`` converts the
published Keras file to a state dict.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from scripts.io.atomic import atomic_output
from scripts.io.weights_metadata import (
    PUBLISHED_RECIPE,
    PUBLISHED_VOXEL_SIZE_NM,
    MetadataError,
    WeightsMetadata,
    read_metadata,
    write_metadata,
)
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.keras import KerasWeightsError, keras_weight_names, load_keras_weights

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "convert",
    "init_network",
    "load_weights",
    "read_state_dict",
    "training_width",
    "weights_info",
    "weights_voxel_size",
]

logger = logging.getLogger(__name__)

KERAS_SUFFIXES = (".h5", ".hdf5")
DEFAULT_WIDTH = 64  # the published network's m
# The first encoder convolution's output channels are the network's width.
_WIDTH_KEY = "encoder.initial_conv.conv_3.weight"


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or made for another network."""


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file says about the network it fits and what it was trained on.

    Attributes:
        path: the file.
        format: "pytorch" or "keras".
        width: the network width (``DoubleDecoderNet(width=...)``).
        voxel_size_nm: in-plane voxel size of the training tomograms; None when unknown.
        recipe: the training recipe ("reference", "robust", "published"...); None when unknown.
        trained_on: a free description of the training data; None when unknown.
    """

    path: Path
    format: str
    width: int
    voxel_size_nm: float | None = None
    recipe: str | None = None
    trained_on: str | None = None


def _existing(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise WeightsError("no weights file given")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict from a PyTorch file, loaded with ``weights_only=True``."""
    path = _existing(path)
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


def _keras_width(path: Path) -> int:
    try:
        with h5py.File(path, "r") as handle:
            names = keras_weight_names(handle["encoder"], f"{path}:encoder")
            # The first bottleneck's third conv (index 4: kernel, bias, kernel, bias, kernel) outputs w.
            return int(handle["encoder"][names[4]].shape[-1])
    except (OSError, KeyError, IndexError, KerasWeightsError) as err:
        raise WeightsError(f"{path}: cannot read the network width ({err})") from err


def weights_info(path: str | os.PathLike) -> WeightsInfo:
    """Format, network width and training metadata of a weights file (``.h5``/``.hdf5``: Keras;
    anything else: PyTorch). The metadata comes from the sidecar (``model.pt`` -> ``model.pt.json``)
    when it matches the file; a Keras file without one is the published network (9.8 nm, recipe
    "published")."""
    path = _existing(path)
    if path.suffix.lower() in KERAS_SUFFIXES:
        fmt, width = "keras", _keras_width(path)
    else:
        state = read_state_dict(path)
        if _WIDTH_KEY not in state:
            raise WeightsError(f"{path}: not a DoubleDecoderNet state dict (no {_WIDTH_KEY})")
        fmt, width = "pytorch", int(state[_WIDTH_KEY].shape[0])
    try:
        meta = read_metadata(path, width)
    except MetadataError as err:
        raise WeightsError(str(err)) from err
    if meta is None and fmt == "keras":
        meta = WeightsMetadata(voxel_size_nm=PUBLISHED_VOXEL_SIZE_NM, recipe=PUBLISHED_RECIPE)
    meta = meta or WeightsMetadata()
    return WeightsInfo(path, fmt, width, meta.voxel_size_nm, meta.recipe, meta.trained_on)


def weights_voxel_size(path: str | os.PathLike | None) -> float | None:
    """The voxel size (nm) the weights were trained at; None without weights or metadata."""
    return None if path is None else weights_info(path).voxel_size_nm


def load_weights(net: DoubleDecoderNet, path: str | os.PathLike | None) -> DoubleDecoderNet:
    """Load ``path`` into ``net`` (in place) and return it.

    Accepts a plain state dict (``bundle/models/model.pt``), a MONAI checkpoint with a ``network``
    entry, or a Keras 2 ``.h5`` file of the published network. ``None`` keeps the initial weights.
    """
    if path is None:
        logger.warning("no weights file given: the network keeps its random initial weights")
        return net
    path = _existing(path)
    if path.suffix.lower() in KERAS_SUFFIXES:
        try:
            load_keras_weights(net, path)
        except KerasWeightsError as err:
            raise WeightsError(str(err)) from err
    else:
        state = read_state_dict(path)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsError(
                f"{path}: does not fit a width-{net.width} DoubleDecoderNet; check the 'width' setting "
                f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
            ) from err
    logger.info("loaded weights %s into a width-%d network", path, net.width)
    return net


def training_width(width: int | str | None, init_weights: str | os.PathLike | None) -> int:
    """The width a training run builds: that of ``init_weights`` when given, else ``width``, else 64.

    A ``width`` given together with ``init_weights`` must match the file's (WeightsError otherwise):
    fine-tuning cannot change the network's shape.
    """
    wanted = None if width in (None, "", "null", "None") else width
    if wanted is not None and (isinstance(wanted, bool) or not str(wanted).isdigit() or int(wanted) < 1):
        raise WeightsError(f"width must be a positive whole number, got {width!r}")
    if init_weights in (None, "", "null", "None"):
        return DEFAULT_WIDTH if wanted is None else int(wanted)
    found = weights_info(init_weights).width
    if wanted is not None and int(wanted) != found:
        raise WeightsError(
            f"init_weights {init_weights} is a width-{found} network but width {wanted} was "
            f"asked for; drop --width (it comes from the weights) or pick other weights"
        )
    return found


def init_network(net: DoubleDecoderNet, init_weights: str | os.PathLike | None) -> DoubleDecoderNet:
    """``net`` with the weights of ``init_weights`` (fine-tuning's starting point); unchanged for None.

    Any file ``load_weights`` reads: a ``model.pt``, a run's ``last.pt`` (only its network: the
    optimisers and epoch start afresh, unlike ``resume``) or the published Keras ``.h5``.
    """
    if init_weights in (None, "", "null", "None"):
        return net
    logger.info("training starts from the weights of %s", init_weights)
    return load_weights(net, init_weights)


def convert(keras_file: str, output: str, width: int | None = None) -> str:
    """Convert a Keras weights file to a PyTorch state dict the bundle configs load.

    The sidecar ``OUTPUT.json`` gets the Keras file's metadata: its own sidecar's, else the published
    network's (9.8 nm, recipe "published").

    Args:
        keras_file: Keras 2 ``save_weights`` HDF5 file.
        output: ``.pt`` file to write (written to a temporary name, then renamed).
        width: network width; read from the file when omitted.
    """
    info = weights_info(keras_file)
    width = info.width if width is None else width
    net = load_keras_weights(DoubleDecoderNet(width=width), keras_file)
    with atomic_output(output) as tmp:
        torch.save(net.state_dict(), tmp)
    trained_on = info.trained_on or f"converted from {Path(keras_file).name}"
    write_metadata(output, WeightsMetadata(width, info.voxel_size_nm, info.recipe, trained_on))
    print(f"wrote {output} (width {width}, {info.voxel_size_nm} nm voxels) from {keras_file}")
    return output


def main() -> None:
    """Command line entry: a bad file gives one clear line and exit status 1, not a traceback."""
    import fire

    try:
        fire.Fire(convert)
    except (KerasWeightsError, WeightsError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
