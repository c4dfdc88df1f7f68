"""Validation metrics of the paper, as plain functions and as Ignite metrics.

Label metrics use only annotated pixels (mask 1) and the paper's hard threshold t = 0.9 on the tanh
output: a pixel is a positive prediction if ``p > t``, a negative prediction if ``p < -t``, and
*uncertain* in between. Uncertain pixels are never correct:

- precision = TP / (TP + FP), TP = membrane & p > t, FP = background & p > t
- recall = TP / (membrane pixels): uncertain membrane pixels count as missed
- accuracy = (TP + TN) / (annotated pixels), TN = background & p < -t: uncertain pixels count wrong
- F1 = 2 P R / (P + R)
- Dice at the inference threshold (p > 0 is membrane): 2 |pred & membrane| / (|pred| + |membrane|)

Image accuracy: the fraction of pixels with ``|x - x_hat| <= std(x)``, std over each slice.
All are pooled over the pixels of the whole validation set (not averaged per slice); an empty
denominator gives 0 (Dice: 1 when both prediction and truth are empty).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.utils import CommonKeys as Keys
from scripts.io.atomic import atomic_output

__all__ = [
    "LABEL_MEASURES",
    "ImageAccuracy",
    "LabelMetric",
    "MetricsWriter",
    "image_counts",
    "label_counts",
    "label_scores",
    "make_metrics",
]

LABEL_MEASURES = ("accuracy", "precision", "recall", "f1", "dice")
ALL_MEASURES = (*LABEL_MEASURES, "image_accuracy")
# Count vector layout of label_counts.
_N_VALID, _N_POS, _TP, _FP, _TN, _DICE_TP, _DICE_PRED = range(7)


def label_counts(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 0.9
) -> torch.Tensor:
    """Counts over a batch (N, 1, H, W): [annotated, membrane, TP, FP, TN, Dice TP, Dice predicted],
    float64 on the CPU. ``target`` is the {-1, +1} (or {0, 1}) label, ``pred`` the tanh output."""
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask > 0.5
    positive = (target > 0) & valid
    negative = (target <= 0) & valid
    above, below = pred > threshold, pred < -threshold
    dice_pred = (pred > 0) & valid
    counts = [valid, positive, positive & above, negative & above, negative & below, dice_pred & positive, dice_pred]
    return torch.stack([c.sum() for c in counts]).to(device="cpu", dtype=torch.float64)


def _ratio(num: float, den: float, empty: float = 0.0) -> float:
    return float(num / den) if den > 0 else empty


def label_scores(counts: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """accuracy, precision, recall, f1, dice from a (summed) label_counts vector."""
    n_valid, n_pos, tp, fp, tn, dice_tp, dice_pred = (float(c) for c in counts)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, n_pos)
    return {
        "accuracy": _ratio(tp + tn, n_valid),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "dice": _ratio(2 * dice_tp, dice_pred + n_pos, empty=1.0),
    }


def image_counts(image_pred: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[pixels within one std of the input, pixels] over a batch (N, C, H, W), std per sample."""
    std = image.flatten(1).std(dim=1, correction=0).view(-1, *([1] * (image.dim() - 1)))
    close = (image_pred - image).abs() <= std
    total = torch.tensor(close.numel(), device=close.device)
    return torch.stack([close.sum(), total]).to("cpu", torch.float64)


def _unpack(output: Mapping[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(label prediction, image prediction) from an engine output whose PRED is a tensor or a tuple."""
    pred = output[Keys.PRED]
    if isinstance(pred, (tuple, list)):
        return pred[0], pred[1]
    return pred, None


def label_output(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tanh prediction, target, mask) from a SupervisedEvaluator output with PrepareSliceBatch targets."""
    label_pred, _ = _unpack(output)
    targets = output[Keys.LABEL]
    if isinstance(targets, Mapping):
        return label_pred, targets["label"], targets.get("mask")
    return label_pred, targets, None


def image_output(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, input image) from an evaluator output; needs a network with outputs="both"."""
    _, image_pred = _unpack(output)
    if image_pred is None:
        raise ValueError("image accuracy needs the reconstruction: build the network with outputs='both'")
    return image_pred, output[Keys.IMAGE]


class LabelMetric(Metric):
    """One of ``LABEL_MEASURES``, pooled over the epoch; counts are all-reduced across DDP ranks."""

    def __init__(
        self,
        measure: str = "f1",
        threshold: float = 0.9,
        output_transform: Callable = label_output,
        device: str | torch.device = "cpu",
    ) -> None:
        if measure not in LABEL_MEASURES:
            raise ValueError(f"measure must be one of {LABEL_MEASURES}, got {measure!r}")
        self.measure = measure
        self.threshold = threshold
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(7, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor | None]) -> None:
        pred, target, mask = output
        self._counts += label_counts(pred.detach(), target, mask, self.threshold).to(self._device)

    @sync_all_reduce("_counts")
    def compute(self) -> float:
        return label_scores(self._counts)[self.measure]


class ImageAccuracy(Metric):
    """Fraction of pixels with ``|x - x_hat| <= std(x)``, pooled over the epoch."""

    def __init__(self, output_transform: Callable = image_output, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        image_pred, image = output
        self._counts += image_counts(image_pred.detach(), image).to(self._device)

    @sync_all_reduce("_counts")
    def compute(self) -> float:
        return _ratio(float(self._counts[0]), float(self._counts[1]))


def make_metrics(
    names: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    threshold: float = 0.9,
) -> dict[str, Metric]:
    """``{"val_<name>": metric}`` for ``names`` (default: all of ``ALL_MEASURES``) minus ``exclude``.

    The config builds the evaluator's key metric with ``names=@key_metric`` and the other metrics
    with ``exclude=@key_metric``.
    """
    names = list(ALL_MEASURES) if names is None else [names] if isinstance(names, str) else list(names)
    excluded = set() if exclude is None else {exclude} if isinstance(exclude, str) else set(exclude)
    unknown = [n for n in [*names, *excluded] if n not in ALL_MEASURES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {ALL_MEASURES}")
    metrics: dict[str, Metric] = {}
    for name in names:
        if name in excluded:
            continue
        metric = ImageAccuracy() if name == "image_accuracy" else LabelMetric(name, threshold)
        metrics[f"val_{name}"] = metric
    return metrics


class MetricsWriter:
    """Evaluator handler: per-tomogram and overall metrics to ``metrics.json`` and ``metrics.csv``.

    Needs ``engine.state.batch["image_path"]`` (added by ``LoadSliced``) and an evaluator output with
    ``PrepareSliceBatch`` targets. Files are written atomically when the evaluation completes.
    """

    def __init__(
        self, output_dir: str | os.PathLike, threshold: float = 0.9, info: Mapping[str, Any] | None = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.info = dict(info or {})
        self._label: dict[str, torch.Tensor] = {}
        self._image: dict[str, torch.Tensor] = {}
        self._slices: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._label, self._image, self._slices = {}, {}, {}

    def _update(self, engine: Engine) -> None:
        output = engine.state.output
        label_pred, target, mask = label_output(output)
        _, image_pred = _unpack(output)
        paths = engine.state.batch.get("image_path", ["all"] * len(label_pred))
        for i, path in enumerate(paths):
            sample_mask = None if mask is None else mask[i : i + 1]
            counts = label_counts(label_pred[i : i + 1], target[i : i + 1], sample_mask, self.threshold)
            self._label[path] = self._label.get(path, torch.zeros(7, dtype=torch.float64)) + counts
            self._slices[path] = self._slices.get(path, 0) + 1
            if image_pred is not None:
                img = image_counts(image_pred[i : i + 1], output[Keys.IMAGE][i : i + 1])
                self._image[path] = self._image.get(path, torch.zeros(2, dtype=torch.float64)) + img

    def _scores(self, paths: Sequence[str]) -> dict[str, float]:
        scores = label_scores(sum((self._label[p] for p in paths), torch.zeros(7, dtype=torch.float64)))
        if self._image:
            close, total = sum((self._image[p] for p in paths), torch.zeros(2, dtype=torch.float64)).tolist()
            scores["image_accuracy"] = _ratio(close, total)
        return scores

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = sorted(self._label)
        rows = [{"volume": p, "slices": self._slices[p], **self._scores([p])} for p in paths]
        overall = {"volume": "overall", "slices": sum(self._slices.values()), **self._scores(paths)}
        report = {
            **self.info,
            "threshold": self.threshold,
            "overall": overall,
            "per_volume": rows,
            "engine_metrics": {k: float(v) for k, v in engine.state.metrics.items()},
        }
        with atomic_output(self.output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        with atomic_output(self.output_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(overall))
            writer.writeheader()
            writer.writerows([*rows, overall])
        engine.logger.info("metrics written to %s: %s", self.output_dir / "metrics.json", overall)
