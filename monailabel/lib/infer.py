"""MONAI Label inference task: a whole tomogram in, a 3D membrane mask out, predicted slice by slice.

Everything model-specific comes from the bundle's ``configs/inference.json``: the network
(``network_def`` with the weights), the ``predictor`` (``scripts.infer.predict.SlicePredictor``: per-slice
standardisation, sliding window, optional TTA) and the ``postprocessing`` (threshold, erosion, ...).

This is a ``BasicInferTask`` rather than a ``BundleInferTask`` subclass: ``BundleInferTask`` imports
``monailabel.transform.post``, which imports torchvision at module level, and no torchvision build on
PyPI loads beside the CPU torch (its extension links the CUDA libraries). What ``BundleInferTask``
takes from the bundle is taken here the same way: image/pred keys from the first input/output of
``network_data_format``, label names from the output ``channel_def``, description and version from
``metadata.json``, the ``model_filename`` choice among ``models/*.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import device_list

from .request_options import (
    SEGMENTATION_OPTIONS,
    OptionError,
    Spec,
    device_choices,
    infer_options,
    parse_options,
    refuse_expressions,
)

logger = logging.getLogger(__name__)

MASK_VALUE = 1  # membrane voxels in the returned mask; 0 is background to every viewer


class TomogramSegmentation(BasicInferTask):
    """Segment the membranes of a tomogram (MRC, TIFF stack or NIfTI) with the bundle's network.

    Request options (also listed in /info, so 3D Slicer shows them): ``tta`` (8-fold flips/rotations),
    ``tta_polarity`` (also average over the negated slice, for either contrast),
    ``threshold`` (tanh cut, 0 in the paper), ``batch_size`` (slices per forward pass),
    ``slice_range`` (``[z0, z1)`` to segment, e.g. "10-40"; empty: all; other slices stay 0),
    ``probability`` (return the membrane probability instead of the mask: "uint8" 0-255 or
    "float16" 0-1),
    ``model_filename`` (one of ``models/*.pt``) and ``result_extension`` (``.mrc``, ``.tif``,
    ``.nii.gz``...; default: the study's own format, so that a viewer opens image and mask with the
    same reader and the same geometry). The mask is uint8 (1 = membrane) with the study's voxel size.
    """

    def __init__(self, bundle_path: str | os.PathLike, conf: dict[str, str] | None = None) -> None:
        self.bundle_path = str(bundle_path)
        configs = Path(bundle_path) / "configs"
        self.config_file = configs / "inference.json"
        metadata = json.loads((configs / "metadata.json").read_text())
        data_format = metadata["network_data_format"]
        key_image = next(iter(data_format["inputs"]))
        key_pred, pred = next(iter(data_format["outputs"].items()))
        # One tanh channel per class, no background channel: class k is mask value k + 1.
        channels = sorted(pred.get("channel_def", {"0": "membrane"}).items(), key=lambda kv: int(kv[0]))
        names = [name.lower() for _, name in channels if name.lower() != "background"]
        labels = {name: i + MASK_VALUE for i, name in enumerate(names)}

        raw = ConfigParser.load_config_file(str(self.config_file))
        models = sorted((p.name for p in (Path(bundle_path) / "models").glob("*.pt")), key=len)
        super().__init__(
            path=str(Path(bundle_path) / "models" / "model.pt"),
            network=None,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=metadata.get("description", ""),
            input_key=key_image,
            output_label_key=key_pred,
            config={
                "tta": bool(raw.get("tta", False)),
                "tta_polarity": bool(raw.get("tta_polarity", False)),
                "threshold": float(raw.get("threshold", 0.0)),
                "batch_size": int(raw.get("batch_size", 2)),
                "slice_range": "",
                "probability": ["none", "uint8", "float16"],  # a combo box in 3D Slicer
                "model_filename": models or ["model.pt"],
            },
            preload=False,
        )
        self.version = metadata.get("version")
        width = raw.get("width")  # an explicit number, else (the default) read from the weights
        self.width = width if isinstance(width, int) else None
        self._lock = threading.Lock()
        self._cached: tuple[tuple, Any] | None = None

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        return i

    def option_schema(self) -> dict[str, Spec]:
        """The options an /infer request may carry (request_options); models/*.pt re-read each time."""
        import torch

        models = sorted((p.name for p in (Path(self.bundle_path) / "models").glob("*.pt")), key=len)
        return infer_options(models, device_choices(device_list(), torch.cuda.device_count()))

    # ------------------------------------------------------------------ helpers

    def weights_path(self, data: dict[str, Any] | None = None) -> Path:
        models = Path(self.bundle_path) / "models"
        name = (data or {}).get("model_filename") or "model.pt"
        name = name if isinstance(name, str) else name[0]
        path = (models / os.path.basename(name)).resolve()
        return path if path.is_file() else models / "model.pt"

    def is_valid(self) -> bool:
        return (Path(self.bundle_path) / "models" / "model.pt").is_file()

    def _parser(self, **overrides: Any) -> ConfigParser:
        refuse_expressions(overrides)  # request values arrive parsed; this holds it at the parser
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update({"bundle_root": self.bundle_path, **overrides})
        return parser

    def _segmentation_options(self, data: dict[str, Any]) -> dict[str, Any]:
        """The segmentation options of ``data`` (the request over the /info defaults) as typed values:
        parsed again here, by the same allow-list as the request, whatever way the request came."""
        given = {name: data[name] for name in SEGMENTATION_OPTIONS if name in data}
        try:
            return parse_options(given, SEGMENTATION_OPTIONS)
        except OptionError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None

    def _predictor(self, device: str, weights: Path, tta: bool, tta_polarity: bool = False) -> Any:
        """The bundle's SlicePredictor, cached until the weights file or its metadata sidecar (the
        voxel size it was trained at) changes: a retrain replaces both."""
        from scripts.io.weights_metadata import metadata_path

        sidecar = metadata_path(weights)
        stamp = sidecar.stat().st_mtime_ns if sidecar.is_file() else None
        key = (device, str(weights), weights.stat().st_mtime_ns, stamp, tta, tta_polarity)
        with self._lock:
            if self._cached is None or self._cached[0] != key:
                # inference.json reads the network width from the weights file itself.
                overrides: dict[str, Any] = {
                    "weights": str(weights),
                    "device": device,
                    "tta": tta,
                    "tta_polarity": tta_polarity,
                }
                predictor = self._parser(**overrides).get_parsed_content("predictor")
                logger.info("loaded %s on %s", weights, device)
                self._cached = (key, predictor)
            return self._cached[1]

    def clear(self) -> None:
        with self._lock:
            self._cached = None

    clear_cache = clear

    # ------------------------------------------------------------------ BasicInferTask stages

    def pre_transforms(self, data: dict[str, Any] | None = None) -> list:
        return [self._load]

    def _load(self, data: dict[str, Any]) -> dict[str, Any]:
        from scripts.io.volume import open_volume

        volume = open_volume(data["image_path"] if data.get("image_path") else data["image"])
        data["volume"] = volume
        data[self.input_key] = volume.data  # a memory map where the format allows: never read whole
        return data

    def inferer(self, data: dict[str, Any] | None = None) -> Any:
        return None  # run_inferer below drives the bundle's predictor itself

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        volume = data["volume"]
        weights = self.weights_path(data)
        if not weights.is_file():
            raise HTTPException(
                status_code=503,
                detail=f"no model weights at {weights}: train a model first (POST /train) or upload one (PUT /model)",
            )
        from scripts.infer.segment import output_dtype, segment_volume, slice_bounds
        from scripts.io.sinks import ArraySink

        options = self._segmentation_options(data)
        tta, threshold = options.get("tta", False), options.get("threshold", 0.0)
        tta_polarity = options.get("tta_polarity", False)
        batch, probability = options.get("batch_size", 2), options.get("probability")
        try:
            z0, z1 = slice_bounds(options.get("slice_range"), volume.shape[0], volume.path)
        except ValueError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None
        predictor = self._predictor(str(device), weights, tta, tta_polarity)
        # The study's voxel size against the weights': slices resampled when they differ by > 10 %.
        match = predictor.voxel_match(volume.voxel_size_nm, volume.path.name)
        post = self._parser(threshold=threshold).get_parsed_content("postprocessing")

        # The bundle's slice-segmentation core, as the folder segmenter runs it, into memory.
        mask = np.zeros(volume.shape, dtype=np.uint8)
        sinks = {"mask": [ArraySink(mask)]}
        prob = np.zeros(volume.shape, dtype=output_dtype("prob", probability)) if probability else None
        if prob is not None:
            sinks["prob"] = [ArraySink(prob)]
        segment_volume(
            volume.data, predictor, post, sinks, (z0, z1), batch_size=batch, probability=probability, voxel_match=match
        )
        if post.needs_volume:
            mask = post.volume(mask)
        mask *= MASK_VALUE
        data[self.output_label_key] = prob if prob is not None else mask
        data[self.output_json_key] = {
            "shape": list(mask.shape),
            "output": f"probability ({probability})" if prob is not None else "mask",
            "slices_segmented": [z0, z1],
            "voxel_size_nm": list(volume.voxel_size_nm) if volume.voxel_size_nm else None,
            "membrane_voxels": int(np.count_nonzero(mask)),
            "weights": weights.name,
            "tta": tta,
            "tta_polarity": tta_polarity,
            "voxel_matching": match.summary(),
            "threshold": threshold,
        }
        return data

    def post_transforms(self, data: dict[str, Any] | None = None) -> list:
        return []  # the bundle's post-processing already ran per slice in run_inferer

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        from scripts.io.volume import SUPPORTED_SUFFIXES, volume_suffix, write_volume

        wanted = extension or data.get("result_extension")
        if isinstance(wanted, (list, tuple)):
            wanted = wanted[0] if wanted else None
        study_suffix = volume_suffix(data["volume"].path)
        suffix = "." + str(wanted).strip().lstrip(".").lower() if wanted else study_suffix
        result = dict(data.get(self.output_json_key) or {})
        if suffix not in SUPPORTED_SUFFIXES:
            # Some clients always ask for .nrrd; a mask in the study's format still opens beside it.
            result["note"] = f"result_extension {wanted!r} cannot be written; returned {study_suffix}"
            logger.warning(result["note"])
            suffix = study_suffix
        fd, out = tempfile.mkstemp(prefix="membrane-", suffix=suffix)
        os.close(fd)
        try:
            write_volume(out, data[self.output_label_key], like=data["volume"])
        except BaseException:
            Path(out).unlink(missing_ok=True)
            raise
        result["format"] = suffix
        return out, result
