"""Slice-wise prediction: standardise a batch of z slices, run the network through an inferer, TTA.

Two options make a prediction independent of how the microscope showed the cell: ``tta_polarity``
(average over the slice and its negative, so inverted contrast gives the same mask) and voxel-size
matching (slices resampled to the weights' voxel size, ``scripts.infer.resample``).

Speed (docs/performance.md): the network runs as an inference-only fused copy (BatchNorm folded into
the convs, linear convs merged, ReLUs in the conv) in channels_last layout, optionally compiled with
``torch.compile``. The fused copy gives the eager network's outputs to float32 rounding.

Memory: a budget (``memory_budget_gb``, or a default from the free memory) decides per slice shape the
window, the slices per forward pass and the tensors kept between layers (``scripts.infer.memory``);
when a pass still runs out of memory the predictor retries with half the budget.
On a GPU the slices are standardised on the device and AMP runs in float16 or bfloat16.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import NormalizeIntensity
from scripts.infer.memory import GIB, RUNTIME_BYTES, MemoryPlan, default_budget_bytes, plan_memory, window_size
from scripts.infer.resample import VoxelMatch, match_voxel_size, resample_slices, resampled_size
from scripts.io.pages import keep_freed_memory
from scripts.network.dihedral import DIHEDRAL, dihedral, dihedral_inverse
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import fuse_for_inference
from scripts.options import as_bool, as_optional
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SlicePrediction", "SlicePredictor", "window_size", "amp_dtype", "compile_mode"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# How often a pass that ran out of memory is retried with half the budget.
OOM_RETRIES = 4


@dataclass
class SlicePrediction:
    """Outputs for a batch of slices, each ``(B, H, W)`` float32 on the CPU (None when not asked for)."""

    label: torch.Tensor
    image: torch.Tensor | None = None
    variance: torch.Tensor | None = None


class SlicePredictor:
    """Predict membranes on batches of 2D slices.

    Args:
        network: a ``DoubleDecoderNet`` (``outputs`` "label" or "both").
        inferer: a MONAI inferer; a ``SlidingWindowInferer`` gets its ``roi_size`` set per slice
            shape from ``max_window`` so that a slice that fits is one window.
        max_window: largest window (pixels per axis) run in one pass.
        tta: average the 8 rot90/flip variants.
        tta_polarity: also run every variant on the negated (standardised) slice and average, with
            the reconstruction negated back: a slice and its negative give identical labels.
        weights_voxel_size_nm: the voxel size the weights were trained at (None: unknown).
        match_voxel_size: resample slices whose voxel size differs from it by more than 10 %
            (:meth:`voxel_match` decides per tomogram, :meth:`predict` takes the scale).
        device: where the network runs.
        amp: autocast: True (bfloat16 on CPU, float16 on CUDA), "float16", "bfloat16"; False: float32.
        channels_last: run in channels_last (NHWC) memory format, oneDNN's and cuDNN's fast layout.
        fuse: run a fused inference-only copy of a ``DoubleDecoderNet`` (see ``scripts.network.fusion``).
        compile: ``torch.compile`` the network at the first batch (seconds to minutes; each new slice
            shape compiles again): True, or a mode ("reduce-overhead" adds CUDA graphs,
            "max-autotune"). Slower than the default fused path on the CPUs measured
            (docs/performance.md).
        reuse_buffers: on CPU, memory freed by one slice is reused by the next (faster: no page faults
            on fresh memory). With glibc, freed memory stays in the C heap (process-wide, from the
            first prediction on: ``scripts.io.pages.keep_freed_memory``); elsewhere the fused
            network keeps its own tensors (``scripts.network.buffers``), as much as the budget leaves.
        memory_budget_gb: memory prediction may use, weights included (None: 80 % of the free GPU
            memory; on the CPU half the free memory, at most 4 GiB). Picks the window, the slices per
            pass (``sw_batch_size``, up to the batch) and the kept tensors; the choice is logged.

    ``predict(slices)`` takes a ``(B, H, W)`` array of raw slices (any dtype) and returns a
    :class:`SlicePrediction`. Each slice is standardised on its own (zero mean, unit SD), as in training.
    ``predict(slices, scale)`` runs the network on the slices resampled by ``scale`` (y, x) and
    returns outputs on the input's grid.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Inferer | None = None,
        max_window: Sequence[int] | int = 2048,
        tta: bool = False,
        tta_polarity: bool = False,
        weights_voxel_size_nm: float | None = None,
        match_voxel_size: bool = False,
        device: str | torch.device = "cpu",
        amp: bool = False,
        channels_last: bool = True,
        fuse: bool = True,
        compile: bool = False,
        reuse_buffers: bool = True,
        memory_budget_gb: float | str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.inferer = inferer if inferer is not None else SlidingWindowInferer(roi_size=(-1, -1), overlap=0.25)
        self.max_window = max_window
        self.tta = as_bool(tta, "tta")
        self.tta_polarity = as_bool(tta_polarity, "tta_polarity")
        voxel = as_optional(weights_voxel_size_nm)
        self.weights_voxel_size_nm = float(voxel) if voxel is not None else None
        self.match_voxel_size = as_bool(match_voxel_size, "match_voxel_size")
        self._warned: set[str] = set()
        self.amp_dtype = amp_dtype(amp, self.device)
        self.amp = self.amp_dtype is not None
        self.channels_last = as_bool(channels_last, "channels_last")
        self.fuse = as_bool(fuse, "fuse")
        self.compile_mode = compile_mode(compile)
        self.compile = self.compile_mode is not None
        self.reuse_buffers = as_bool(reuse_buffers, "reuse_buffers")
        self.memory_budget_gb = _budget(memory_budget_gb)
        self._plans: dict[tuple[int, int, int], MemoryPlan] = {}
        self._largest_batch: dict[tuple[int, ...], int] = {}
        # CUDA: a partial last batch is padded to the usual size (cuDNN would tune a new shape for
        # seconds); a pinned staging buffer is reused for the copies to the device.
        self.pad_partial_batches = self.device.type == "cuda"
        self._pinned: torch.Tensor | None = None
        self._user_overlap = getattr(self.inferer, "overlap", 0.25)
        self._heap: bool | None = None
        self._model: nn.Module | None = None
        self._lock = threading.Lock()  # the fused network's reused buffers allow one call at a time
        # Slices stacked along the first axis are "channels" here: channel-wise = per slice.
        self.normalize = NormalizeIntensity(channel_wise=True, dtype=np.float32)

    @property
    def with_image(self) -> bool:
        return getattr(self.network, "outputs", "label") == "both"

    @property
    def model(self) -> nn.Module:
        """What actually runs: built at the first use, so weights loaded after construction count."""
        if self._model is None:
            self._model = self._build()
        return self._model

    def _build(self) -> nn.Module:
        start = time.perf_counter()
        model = self.network
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # slice shapes repeat: pick the fastest conv once
        if self.fuse and isinstance(model, DoubleDecoderNet):
            # The network keeps its own tensors only where the C heap cannot keep freed memory.
            reuse = self.reuse_buffers and self.device.type == "cpu" and not self.heap_kept
            model = fuse_for_inference(model, channels_last=self.channels_last, reuse_buffers=reuse)
        elif self.channels_last:
            # A copy: the caller's network (maybe still training) keeps its layout.
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if self.compile:
            # Freezing lets inductor constant-fold and pre-pack the conv weights (CPU).
            options = {"freezing": True} if self.device.type == "cpu" else None
            mode = None if self.compile_mode == "default" or options else self.compile_mode
            model = torch.compile(model, dynamic=False, options=options, mode=mode)
        logger.debug("inference network ready in %.2f s", time.perf_counter() - start)
        return model

    @property
    def heap_kept(self) -> bool:
        """CPU with ``reuse_buffers``: freed memory stays in the process for the next slice (set
        process-wide at the first use, ``scripts.io.pages.keep_freed_memory``)."""
        if self._heap is None:
            self._heap = self.reuse_buffers and self.device.type == "cpu" and keep_freed_memory()
        return self._heap

    def _runtime_bytes(self) -> int:
        return RUNTIME_BYTES if self.device.type == "cpu" else 0  # the GPU budget is device memory

    def _weights_bytes(self) -> int:
        """The eager network and, when fused, its copy."""
        tensors = (*self.network.parameters(), *self.network.buffers())
        size = sum(t.numel() * t.element_size() for t in tensors)
        return size * (2 if self.fuse else 1)

    def memory_plan(self, slice_shape: Sequence[int], slices: int = 1) -> MemoryPlan:
        """The window, slices per pass and kept tensors for ``slices`` slices of ``slice_shape`` (logged
        the first time a shape is seen)."""
        key = self._plan_key(slice_shape, slices)
        if key not in self._plans:
            budget = (
                int(self.memory_budget_gb * GIB)
                if self.memory_budget_gb is not None
                else default_budget_bytes(self.device)
            )
            self._plans[key] = self._plan(key, budget)
            logger.info("memory plan for %s", self._plans[key].describe(key[:2]))
        return self._plans[key]

    def _plan_key(self, slice_shape: Sequence[int], slices: int) -> tuple[int, int, int]:
        # Only a GPU runs several slices per pass: on the CPU one plan serves every batch size.
        return int(slice_shape[0]), int(slice_shape[1]), int(slices) if self.device.type == "cuda" else 1

    def _plan(self, key: tuple[int, int, int], budget: int) -> MemoryPlan:
        return plan_memory(
            key[:2],
            getattr(self.network, "width", 64),
            budget,
            self._weights_bytes(),
            max_slices=key[2],
            half=self.amp,
            keep_tensors=self.fuse and self.reuse_buffers and self.device.type == "cpu",
            max_window=self.max_window,
            runtime_bytes=self._runtime_bytes(),
            device_type=self.device.type,
            heap=self.heap_kept,
        )

    def _apply(self, plan: MemoryPlan) -> None:
        if isinstance(self.inferer, SlidingWindowInferer):
            self.inferer.roi_size = plan.window
            # The user's overlap where their max_window asked for tiles, else the plan's halo.
            self.inferer.overlap = self._user_overlap if plan.overlap is None else plan.overlap
            self.inferer.sw_batch_size = plan.slices_per_pass
        set_limit = getattr(self.model, "set_kept_bytes", None)
        if set_limit is not None:
            set_limit(plan.kept_bytes)

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = tuple(batch.shape[-2:])
        count = batch.shape[0]
        largest = self._largest_batch[shape] = max(count, self._largest_batch.get(shape, 0))
        if self.pad_partial_batches and count < largest:  # copies of the last slice, dropped below
            batch = torch.cat([batch, batch[-1:].expand(largest - count, *batch.shape[1:])])
        plan = self.memory_plan(shape, batch.shape[0])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        for attempt in range(OOM_RETRIES + 1):
            self._apply(plan)
            try:
                out = self.inferer(batch, self.model)
                break
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _out_of_memory(err) or attempt == OOM_RETRIES:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                key = self._plan_key(shape, batch.shape[0])
                # Half the room for activations (the weights and the process stay what they are).
                fixed = self._runtime_bytes() + self._weights_bytes()
                plan = self._plans[key] = self._plan(key, fixed + max(0, plan.budget_bytes - fixed) // 2)
                logger.warning("out of memory on %s; retrying with %s", self.device, plan.describe(shape))
        if isinstance(out, (tuple, list)):
            return out[0][:count], out[1][:count]
        return out[:count], None

    def voxel_match(self, voxel_size_nm: Sequence[float] | None, name: object = "tomogram") -> VoxelMatch:
        """Whether and how much to resample a tomogram of ``voxel_size_nm`` ((z, y, x), None: unknown)
        for these weights; logs the decision (an unknown voxel size once per predictor)."""
        match = match_voxel_size(voxel_size_nm, self.weights_voxel_size_nm, self.match_voxel_size)
        if match.resampled:
            logger.info(
                "%s: %s nm voxels, weights trained at %g nm: slices resampled x%.3g, x%.3g in plane",
                name,
                "x".join(f"{v:g}" for v in match.tomogram_voxel_size_nm),
                match.weights_voxel_size_nm,
                *match.scale,
            )
        elif match.enabled and match.reason not in self._warned and not match.reason.startswith("within"):
            self._warned.add(match.reason)  # a folder of headerless tomograms: said once, not per file
            logger.warning("%s: slices not resampled: %s", name, match.reason)
        return match

    @torch.inference_mode()
    def predict(self, slices: np.ndarray | torch.Tensor, scale: Sequence[float] | None = None) -> SlicePrediction:
        # A private float32 copy: the slices may be a read-only memory map of the user's tomogram.
        if self.device.type == "cuda" and scale is None:
            batch = self._staged(np.asarray(slices))
        else:
            batch = torch.tensor(np.asarray(slices), dtype=torch.float32)
        if scale is None:
            return self._predict(batch)
        size = tuple(batch.shape[-2:])
        out = self._predict(resample_slices(batch, resampled_size(size, scale)))
        back = [None if t is None else resample_slices(t, size) for t in (out.label, out.image, out.variance)]
        return SlicePrediction(*back)

    def _staged(self, slices: np.ndarray) -> torch.Tensor:
        """The slices as float32 in the reused pinned buffer (free again once a prediction is back)."""
        if self._pinned is None or tuple(self._pinned.shape) != slices.shape:
            self._pinned = torch.empty(slices.shape, dtype=torch.float32, pin_memory=True)
        self._pinned.numpy()[...] = slices
        return self._pinned

    def _predict(self, slices: torch.Tensor) -> SlicePrediction:
        if self.device.type == "cpu":
            batch = torch.as_tensor(self.normalize(slices))
        else:  # copied as they are (pinned: asynchronous), standardised on the device
            pinned = self.device.type == "cuda" and not slices.is_pinned()
            raw = slices.pin_memory() if pinned else slices
            batch = self.normalize(raw.to(self.device, non_blocking=True))
            batch = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
        batch = batch.unsqueeze(1)  # (B, 1, H, W)
        variants = DIHEDRAL if self.tta else DIHEDRAL[:1]
        # -x after standardisation: exactly the standardised negative of the raw slice.
        signs = (1.0, -1.0) if self.tta_polarity else (1.0,)
        labels, images, raw = [], [], []
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp)
        with self._lock, autocast:
            for k, flip in variants:
                pair_labels, pair_images = [], []
                for sign in signs:
                    label, image = self._forward(dihedral(batch if sign > 0 else -batch, k, flip))
                    pair_labels.append(dihedral_inverse(label.float(), k, flip))
                    if image is not None:  # the image decoder reconstructs -x: negated back
                        pair_images.append(sign * dihedral_inverse(image.float(), k, flip))
                raw.extend(pair_labels)
                labels.append(_pair_mean(pair_labels))
                if pair_images:
                    images.append(_pair_mean(pair_images))
        label = torch.stack(labels).mean(dim=0)[:, 0].cpu()
        variance = torch.stack(raw).var(dim=0, unbiased=False)[:, 0].cpu() if self.tta else None
        image = torch.stack(images).mean(dim=0)[:, 0].cpu() if images else None
        return SlicePrediction(label=label, image=image, variance=variance)


def _pair_mean(pair: list[torch.Tensor]) -> torch.Tensor:
    # a + b == b + a in floating point, so a slice and its negative give bit-identical labels.
    return pair[0] if len(pair) == 1 else (pair[0] + pair[1]) / 2


def amp_dtype(amp: object, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the ``amp`` option: None (float32), float16 or bfloat16."""
    names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}  # fmt: skip
    if isinstance(amp, str) and amp.strip().lower() in names:
        return names[amp.strip().lower()]
    try:
        enabled = as_bool(amp, "amp")
    except ValueError:
        raise ValueError(f"amp must be true, false, 'float16' or 'bfloat16', got {amp!r}") from None
    if not enabled:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def compile_mode(value: object) -> str | None:
    """The ``compile`` option as a ``torch.compile`` mode ("default" for true), or None (off)."""
    if isinstance(value, str) and value.strip().lower() in COMPILE_MODES:
        return value.strip().lower()
    try:
        return "default" if as_bool(value, "compile") else None
    except ValueError:
        modes = list(COMPILE_MODES)
        raise ValueError(f"compile must be true, false or one of {modes}, got {value!r}") from None


def _budget(value: object) -> float | None:
    value = as_optional(value)
    if value is None:
        return None
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = -1.0
    if not budget > 0:
        raise ValueError(f"memory_budget_gb must be a number of GiB > 0 or null (automatic), got {value!r}")
    return budget


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text
