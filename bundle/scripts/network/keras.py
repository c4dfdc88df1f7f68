"""Import Keras 2 ``save_weights`` HDF5 files (the published ``weights_semisupervised_2021_05.h5``).

The file's root attribute ``layer_names`` gives the top-level layers in load order and each
group's ``weight_names`` gives its datasets in load order: all trainable weights in construction
order, then every BN's moving mean and variance. ``DoubleDecoderNet`` declares its modules in the
same order, so weights are matched by position and checked by shape and name suffix; numeric
layer suffixes (``conv2d_17``) are never relied on.

Converting a file to a PyTorch state dict and reading its width: ``scripts.network.weights``.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from scripts.network.double_decoder import DoubleDecoderNet
from torch import nn

__all__ = ["KerasWeightsError", "keras_weight_names", "load_keras_weights"]


class KerasWeightsError(ValueError):
    """A weights file that is not the published layout, or does not fit the network."""


def _group_modules(net: DoubleDecoderNet) -> dict[str, nn.Module]:
    """The PyTorch module that holds each top-level Keras layer's weights."""
    return {
        "encoder": net.encoder,
        "mid_branch_0": net.neck.branches[0],
        "mid_branch_1": net.neck.branches[1],
        "mid_branch_2": net.neck.branches[2],
        "image_decoder": net.image_decoder,
        "image_decoder_final_convolution_0": net.image_head[0],
        "image_decoder_final_convolution_1": net.image_head[1],
        "image_decoder_final_convolution_2": net.image_head[2],
        "label_decoder": net.label_decoder,
        "label_decoder_final_batchnorm": net.label_head.norm,
        "label_decoder_final_convolution_1": net.label_head.conv,
        "label_decoder_final_convolution_2": net.label_head.out,
    }


def _keras_slots(module: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    """(torch name, tensor, expected Keras suffix) in Keras load order."""
    slots = []
    for name, param in module.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        is_norm = isinstance(module.get_submodule(owner_name), nn.BatchNorm2d)
        if is_norm:
            suffix = "gamma" if leaf == "weight" else "beta"
        else:
            suffix = "kernel" if leaf == "weight" else "bias"
        slots.append((name, param, suffix))
    for name, buffer in module.named_buffers():
        leaf = name.rpartition(".")[2]
        if leaf in ("running_mean", "running_var"):
            slots.append((name, buffer, "moving_mean" if leaf == "running_mean" else "moving_variance"))
    return slots


def _as_text(value: object) -> str:
    # h5py 3 returns str; files written by h5py 2 hold fixed-length bytes.
    return value.decode("utf8") if isinstance(value, bytes | np.bytes_) else str(value)


def _names(attrs: h5py.AttributeManager, key: str, where: str) -> list[str]:
    if key not in attrs:
        raise KerasWeightsError(f"{where}: no '{key}' attribute; not a Keras 2 save_weights file")
    return [_as_text(v) for v in np.atleast_1d(attrs[key])]


def keras_weight_names(group: h5py.Group, where: str) -> list[str]:
    """A Keras layer group's weight dataset names, in load order."""
    return _names(group.attrs, "weight_names", where)


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    # Conv2D (kh, kw, in, out) and Conv2DTranspose (kh, kw, out, in) both map by (3, 2, 0, 1).
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array


def _check_file(handle: h5py.File, path: Path, expected: list[str]) -> list[str]:
    layer_names = [n for n in _names(handle.attrs, "layer_names", str(path)) if n in handle]
    layer_names = [n for n in layer_names if _names(handle[n].attrs, "weight_names", f"{path}:{n}")]
    if layer_names != expected:
        missing = sorted(set(expected) - set(layer_names))
        extra = sorted(set(layer_names) - set(expected))
        raise KerasWeightsError(
            f"{path}: layers do not match the double-decoder network (missing {missing}, unexpected {extra})"
        )
    return layer_names


def _read_layer(
    group: h5py.Group, layer: str, module: nn.Module, path: Path, width: int
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Read one top-level Keras layer, checking count, kind and shape of every weight."""
    weight_names = _names(group.attrs, "weight_names", f"{path}:{layer}")
    slots = _keras_slots(module)
    if len(weight_names) != len(slots):
        raise KerasWeightsError(
            f"{path}: layer '{layer}' has {len(weight_names)} weights, the network expects "
            f"{len(slots)}; is the file for another width than {width}?"
        )
    staged = []
    for weight_name, (torch_name, tensor, suffix) in zip(weight_names, slots, strict=True):
        kind = weight_name.rpartition("/")[2].partition(":")[0]
        if kind != suffix:
            raise KerasWeightsError(
                f"{path}: '{weight_name}' is a '{kind}', expected '{suffix}' for {layer}.{torch_name}"
            )
        array = _to_torch_layout(np.asarray(group[weight_name]))
        if tuple(array.shape) != tuple(tensor.shape):
            raise KerasWeightsError(
                f"{path}: '{weight_name}' has shape {tuple(group[weight_name].shape)}, "
                f"{layer}.{torch_name} of a width-{width} network needs {tuple(tensor.shape)} "
                f"(Keras layout); is the file for another width?"
            )
        staged.append((tensor, array))
    return staged


def load_keras_weights(net: DoubleDecoderNet, path: str | os.PathLike) -> DoubleDecoderNet:
    """Copy the weights of a Keras 2 HDF5 file into ``net`` in place and return it.

    Raises:
        KerasWeightsError: the file is not a Keras weights file of this architecture, or a shape or
            weight kind differs (e.g. a width-4 file loaded into a width-8 network).
    """
    path = Path(path)
    if not path.is_file():
        raise KerasWeightsError(f"{path}: no such file")
    modules = _group_modules(net)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise KerasWeightsError(f"{path}: not an HDF5 file ({err})") from err
    staged: list[tuple[torch.Tensor, np.ndarray]] = []
    with handle:
        layer_names = _check_file(handle, path, list(modules))
        for layer in layer_names:
            staged += _read_layer(handle[layer], layer, modules[layer], path, net.width)
    # Copy only once every tensor has been checked: a bad file never leaves a half-loaded network.
    with torch.no_grad():
        for tensor, array in staged:
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
    return net
