"""Helpers the training configs call: data lists, SSIM data range, checkpoints, resume, handlers."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    EarlyStopHandler,
    LrScheduleHandler,
    ValidationHandler,
)
from scripts.io.atomic import atomic_output
from scripts.options import as_bool
from scripts.train.dataset import list_training_data, slice_items, slice_items_unlabeled, split_by_file
from scripts.train.slices import VolumeCache

__all__ = [
    "EarlyStopOnValidation",
    "LastCheckpoint",
    "MetricsHistory",
    "ResumeFromCheckpoint",
    "TrainProgressBar",
    "evaluation_items",
    "handlers_for_rank",
    "prepare_data",
    "repeat",
    "ssim_data_range",
    "standardise",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
STD_EPS = 1e-3  # the reference divides by std only above this


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----------------------------------------------------------------------------- data lists


def prepare_data(
    dataset_dir: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0, semi_supervised: bool = True
) -> dict[str, Any]:
    """Slice lists of a dataset folder: ``{"train", "val", "unlabeled"}`` plus ``"split"`` ("file" or
    "slice"). Validation files are drawn with ``split_by_file``; with a single labeled tomogram the
    split is by slices (then validation slices neighbour training slices: an optimistic estimate).
    """
    labeled, unlabeled = list_training_data(dataset_dir)
    if not labeled:
        raise ValueError(f"{dataset_dir}: no labeled tomogram (images/ with labels/): nothing to train on")
    if len(labeled) >= 2:
        train_vols, val_vols = split_by_file(labeled, val_fraction, seed)
        train, val, split = slice_items(train_vols), slice_items(val_vols), "file"
    else:
        items = slice_items(labeled)
        train, val = split_by_file(items, val_fraction, seed)  # the same rule, applied to slices
        split = "slice"
        if val:
            logger.warning(
                "only one labeled tomogram: validation uses %d of its %d annotated slices "
                "(split by slices, not by file)",
                len(val),
                len(items),
            )
    semi_supervised = as_bool(semi_supervised, "semi_supervised")
    unlabeled_items = slice_items_unlabeled(unlabeled) if semi_supervised else []
    if semi_supervised and not unlabeled_items:
        logger.warning("%s: no unlabeled tomogram; training is supervised-only", dataset_dir)
    if _rank() == 0:
        logger.info(
            "data: %d labeled tomograms (%d train / %d validation slices, split by %s), %d unlabeled slices",
            len(labeled),
            len(train),
            len(val),
            split,
            len(unlabeled_items),
        )
    return {"train": train, "val": val, "unlabeled": unlabeled_items, "split": split}


def evaluation_items(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every annotated slice of every labeled tomogram of a dataset folder (no split)."""
    labeled, _ = list_training_data(dataset_dir)
    if not labeled:
        raise ValueError(f"{dataset_dir}: no labeled tomogram to evaluate on")
    return slice_items(labeled)


def repeat(items: Sequence[Any], times: int) -> list[Any]:
    """``items`` repeated ``times`` times: each labeled slice is seen (with fresh augmentation) that often
    per epoch, as the reference's 6 repeats."""
    return list(items) * max(1, int(times))


def standardise(x: np.ndarray) -> np.ndarray:
    """The reference's per-slice standardisation: (x - mean) / std, or x - mean when std <= 1e-3."""
    x = np.asarray(x, dtype=np.float32)
    std = float(x.std())
    return (x - x.mean()) / std if std > STD_EPS else x - x.mean()


def ssim_data_range(
    value: float | str | None,
    data: Mapping[str, Sequence[Mapping[str, Any]]],
    max_slices: int = 64,
    seed: int = 0,
) -> float:
    """SSIM ``data_range``: a number as given, or ``"auto"``: max - min over standardised training slices
    (labeled train + unlabeled; at most ``max_slices`` drawn at random, the reference uses all)."""
    if value is not None and not (isinstance(value, str) and value.strip().lower() == "auto"):
        return float(value)
    items = [*data.get("train", []), *data.get("unlabeled", [])]
    if not items:
        return 1.0
    picked = random.Random(seed).sample(items, min(max_slices, len(items)))
    cache = VolumeCache(4)
    lo, hi = np.inf, -np.inf
    for item in sorted(picked, key=lambda it: (str(it["image"]), int(it["z"]))):
        x = standardise(cache.get(str(item["image"])).data[int(item["z"])])
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    value = max(hi - lo, 1e-3)
    if _rank() == 0:
        logger.info("SSIM data_range = %.3f (max - min of %d standardised slices)", value, len(picked))
    return value


# ----------------------------------------------------------------------------- checkpoint state


def _attached(engine: Engine, cls: type) -> list[Any]:
    """Handler objects of type ``cls`` attached to ``engine``, in attachment order (bound methods are
    resolved to their object).

    Ignite has no public way to list an engine's handlers (``has_event_handler`` only checks a known
    one, and the CheckpointSavers are attached by the evaluator's config), hence ``_event_handlers``.
    """
    found: list[Any] = []
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            owner = getattr(handler, "__self__", handler)
            if isinstance(owner, cls) and not any(owner is f for f in found):
                found.append(owner)
    return found


class _EvaluatorState:
    """Resumable state of an evaluator: best key metric and epoch, the best-model list of its
    CheckpointSavers (so a resumed run overwrites model.pt only with a better model) and the
    counters of the early-stop handlers listening to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        # MONAI's CheckpointSaver loads its best-model list (load_state_dict) but has no state_dict to
        # save it; the list lives in its Ignite Checkpoint, whose state_dict is public.
        savers = [s._key_metric_checkpoint for s in _attached(self.engine, CheckpointSaver)]
        return {
            "best_metric": float(self.engine.state.best_metric),
            "best_metric_epoch": int(self.engine.state.best_metric_epoch),
            "savers": [dict(c.state_dict()) if c is not None else {} for c in savers],
            "early_stops": [e.state_dict() for e in _attached(self.engine, EarlyStopOnValidation)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.state.best_metric = state["best_metric"]
        self.engine.state.best_metric_epoch = state["best_metric_epoch"]
        savers = _attached(self.engine, CheckpointSaver)
        for saver, saved in zip(savers, state.get("savers", []), strict=False):
            if saved:  # saved only by a saver that keeps the best model, as the configured one does
                saver.load_state_dict(saved)
        stoppers = _attached(self.engine, EarlyStopOnValidation)
        for stopper, saved in zip(stoppers, state.get("early_stops", []), strict=False):
            stopper.load_state_dict(saved)


def _stateful(objects: Mapping[str, Any], trainer: Engine) -> dict[str, Any]:
    """``objects`` with evaluators wrapped in ``_EvaluatorState``, None dropped, plus the trainer."""
    out = {k: _EvaluatorState(v) if isinstance(v, Engine) else v for k, v in objects.items() if v is not None}
    out["trainer"] = trainer
    return out


class LastCheckpoint:
    """Trainer handler: save ``save_dict`` (+ the trainer) to ``save_dir/last.pt`` every ``interval``
    epochs, atomically (write a temporary file, then rename): an interruption loses at most the
    epoch in progress. An evaluator in ``save_dict`` is saved with its best metric, its
    CheckpointSavers' best-model list and its early-stop counters.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = LAST_CHECKPOINT,
        interval: int = 1,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        payload = {key: obj.state_dict() for key, obj in _stateful(self.save_dict, engine).items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            torch.save(payload, tmp)
        engine.logger.info("epoch %d: saved %s", engine.state.epoch, self.path)


class ResumeFromCheckpoint:
    """Trainer handler: with ``enabled``, load ``checkpoint_dir/last.pt`` (network, both optimisers,
    trainer epoch/iteration, best metric, early-stop counter) when training starts. Without a
    checkpoint it warns and starts from scratch, so ``--resume true`` is safe on a first run.
    ``max_epochs`` stays the configured one, so a resumed run can train for longer.
    """

    def __init__(
        self,
        enabled: bool | str,
        checkpoint_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        filename: str = LAST_CHECKPOINT,
        map_location: Any = None,
    ) -> None:
        self.enabled = as_bool(enabled, "resume")
        self.path = Path(checkpoint_dir) / filename
        self.load_dict = dict(load_dict)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.warning("resume: no checkpoint %s; training starts from scratch", self.path)
            return
        # Built at STARTED, when every handler (CheckpointSaver, early stop) is attached.
        objects = _stateful(self.load_dict, engine)
        loader = CheckpointLoader(str(self.path), objects, map_location=self.map_location)
        loader.logger = engine.logger
        loader(engine)


class EarlyStopOnValidation:
    """Stop training when the evaluator's key metric (or ``metric_name``) has not improved for
    ``patience`` validation rounds. Listed among the trainer's handlers; it listens to the evaluator
    (no config cycle trainer <-> evaluator). ``patience`` <= 0 disables it. Ignite's ``EarlyStopping``
    does the counting; its state (the counter and best score) is saved in ``last.pt``.
    """

    def __init__(
        self, evaluator: Engine, patience: int, metric_name: str | None = None, min_delta: float = 0.0
    ) -> None:
        self.enabled = int(patience) > 0
        self.patience = max(1, int(patience))
        self.min_delta = float(min_delta)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.stopping: EarlyStopping | None = None

    def _score(self, engine: Engine) -> float:
        return float(engine.state.metrics[self.metric_name or engine.state.key_metric_name])

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            self.stopping = EarlyStopping(self.patience, self._score, engine, min_delta=self.min_delta)
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if self.stopping is not None:
            self.stopping(evaluator)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.stopping.state_dict()) if self.stopping is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state and self.stopping is not None:
            self.stopping.load_state_dict(state)


# ----------------------------------------------------------------------------- logging


class MetricsHistory:
    """Trainer handler: one JSON line per epoch in ``output_dir/history.jsonl`` with the training
    losses and, on validation epochs, the evaluator's metrics. Attach after ValidationHandler."""

    def __init__(
        self, output_dir: str | os.PathLike, evaluator: Engine | None = None, filename: str = "history.jsonl"
    ) -> None:
        self.path = Path(output_dir) / filename
        self.evaluator = evaluator
        self._start = time.monotonic()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        # Keep the epochs the (possibly resumed) trainer has done: a fresh run starts a new file, a
        # resumed one drops lines of an epoch that finished after the last checkpoint.
        self._start = time.monotonic()
        if self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= engine.state.epoch]
            with atomic_output(self.path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept))

    def __call__(self, engine: Engine) -> None:
        record: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "elapsed_s": round(time.monotonic() - self._start, 2),
            **{k: float(v) for k, v in engine.state.metrics.items()},
        }
        ev = self.evaluator
        if ev is not None and ev.state.epoch == engine.state.epoch and ev.state.metrics:
            record.update({k: float(v) for k, v in ev.state.metrics.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TrainProgressBar(ProgressBar):
    """tqdm progress bar over the iterations of an epoch, showing the last loss and step kind."""

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("output_transform", lambda out: {"loss": float(out["loss"])})
        super().attach(engine, *args, **kwargs)


# Handlers every DDP rank needs: validation and early stopping run everywhere (the metrics are
# all-reduced, so all ranks stop together), every rank loads the resume checkpoint.
ALL_RANK_HANDLERS = (
    ValidationHandler,
    EarlyStopHandler,
    EarlyStopOnValidation,
    CheckpointLoader,
    ResumeFromCheckpoint,
    LrScheduleHandler,
)


def handlers_for_rank(handlers: Sequence[Any] | None, all_ranks: Sequence[type] = ALL_RANK_HANDLERS) -> list[Any]:
    """The handlers this DDP rank attaches: all on rank 0; only ``all_ranks`` types elsewhere
    (logging, TensorBoard, checkpoint saving and the progress bar stay on rank 0)."""
    if not handlers:
        return []
    if _rank() == 0:
        return list(handlers)
    return [h for h in handlers if isinstance(h, tuple(all_ranks))]
