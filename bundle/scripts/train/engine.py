"""Semi-supervised Ignite trainer: labeled and unlabeled iterations alternate within each epoch.

Labeled iteration: the whole network (encoder, neck, both decoders) is trained with ``LabeledLoss``
by the "labeled" Adam (all parameters).

Unlabeled iteration: the network runs with ``outputs="image"``, i.e. encoder -> neck -> image
decoder -> image head only, and is trained with ``UnlabeledLoss`` by the "unlabeled" Adam, which
holds every parameter except the segmentation decoder and head. The label branch is never
executed, so by construction its weights get no gradient, its Adam moments (in the labeled Adam)
are not touched, and its BatchNorm running statistics never see unlabeled data. This is what the
reference does with a frozen decoder and a separate optimiser per step kind. Under DDP the same
switch goes through the DDP wrapper, which needs ``find_unused_parameters=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "LABELED",
    "UNLABELED",
    "AlternatingLoader",
    "PrepareSliceBatch",
    "SemiSupervisedTrainer",
    "image_only",
    "unlabeled_parameters",
    "unwrap",
]

LABELED, UNLABELED = "labeled", "unlabeled"
PHASE_KEY = "phase"
SCHEDULES = ("blocks", "ratio")


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def unlabeled_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters trained in unlabeled steps: all but ``segmentation_parameters()``."""
    net = unwrap(network)
    frozen = {id(p) for p in net.segmentation_parameters()}
    return [p for p in net.parameters() if id(p) not in frozen]


@contextmanager
def image_only(network: nn.Module) -> Iterator[None]:
    """Run a DoubleDecoderNet (possibly DDP-wrapped) with ``outputs="image"`` inside the block."""
    net = unwrap(network)
    previous = net.outputs
    net.outputs = "image"
    try:
        yield
    finally:
        net.outputs = previous


class PrepareSliceBatch:
    """``prepare_batch`` for trainer and evaluator: ``(image, {"label", "mask"})``, or ``(image, None)``
    for unlabeled batches. Tensors are (N, 1, H, W)."""

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        def move(x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking, **kwargs)

        image = move(batchdata[Keys.IMAGE])
        if Keys.LABEL not in batchdata:
            return image, None
        targets = {"label": move(batchdata[Keys.LABEL])}
        if "mask" in batchdata:
            targets["mask"] = move(batchdata["mask"])
        return image, targets


class AlternatingLoader:
    """Iterable over labeled and unlabeled batches in a fixed per-epoch order; each batch (a dict)
    gets ``batch["phase"]`` = "labeled" or "unlabeled".

    Schedules (one Ignite epoch each):
        - ``"blocks"`` (reference): one pass over the labeled loader, then ``unlabeled_steps_per_epoch``
          unlabeled batches (default: one pass over the unlabeled loader).
        - ``"ratio"``: ``labeled_steps`` labeled batches, then ``unlabeled_steps`` unlabeled ones, repeated
          until the labeled loader is exhausted (e.g. 1:1 alternates every iteration).

    The unlabeled loader is cycled across epochs, so a capped unlabeled block still visits every slice.
    The plan depends only on loader lengths, so DDP ranks (equal lengths with DistributedSampler)
    always run the same kind of step at the same iteration.
    """

    def __init__(
        self,
        labeled: Iterable,
        unlabeled: Iterable | None = None,
        schedule: str = "blocks",
        labeled_steps: int = 1,
        unlabeled_steps: int = 1,
        unlabeled_steps_per_epoch: int | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if labeled_steps < 1 or unlabeled_steps < 0:
            raise ValueError("labeled_steps must be >= 1 and unlabeled_steps >= 0")
        self.labeled = labeled
        self.unlabeled = unlabeled if unlabeled is not None and len(unlabeled) > 0 else None
        self.schedule = schedule
        self.labeled_steps = int(labeled_steps)
        self.unlabeled_steps = int(unlabeled_steps)
        self.unlabeled_steps_per_epoch = unlabeled_steps_per_epoch
        self._unlabeled_iter: Iterator | None = None
        if len(labeled) == 0:
            raise ValueError("the labeled loader is empty: no annotated slice to train on")

    def plan(self) -> list[str]:
        """The phase of every iteration of one epoch."""
        n_labeled = len(self.labeled)
        if self.unlabeled is None:
            return [LABELED] * n_labeled
        if self.schedule == "blocks":
            n_unlabeled = self.unlabeled_steps_per_epoch
            n_unlabeled = len(self.unlabeled) if n_unlabeled is None else int(n_unlabeled)
            return [LABELED] * n_labeled + [UNLABELED] * n_unlabeled
        phases: list[str] = []
        for start in range(0, n_labeled, self.labeled_steps):
            phases += [LABELED] * min(self.labeled_steps, n_labeled - start)
            phases += [UNLABELED] * self.unlabeled_steps
        return phases

    def __len__(self) -> int:
        return len(self.plan())

    def _next_unlabeled(self) -> Any:
        if self._unlabeled_iter is None:
            self._unlabeled_iter = iter(self.unlabeled)
        try:
            return next(self._unlabeled_iter)
        except StopIteration:
            self._unlabeled_iter = iter(self.unlabeled)
            return next(self._unlabeled_iter)

    def __iter__(self) -> Iterator[dict]:
        labeled_iter = iter(self.labeled)
        for phase in self.plan():
            batch = next(labeled_iter) if phase == LABELED else self._next_unlabeled()
            batch = dict(batch)
            batch[PHASE_KEY] = phase
            yield batch

    def samplers(self) -> list[Any]:
        loaders = (self.labeled, self.unlabeled)
        return [getattr(loader, "sampler", None) for loader in loaders if loader is not None]


class SemiSupervisedTrainer(SupervisedTrainer):
    """A MONAI ``SupervisedTrainer`` that alternates labeled and unlabeled iterations.

    Args:
        device, max_epochs, network, inferer, amp, ...: as ``SupervisedTrainer``.
        train_data_loader: labeled slices: dicts with "image", "label", "mask", (N, 1, H, W).
        optimizer: Adam over all parameters (labeled steps).
        loss_function: ``LabeledLoss``: ``(label_pred, image_pred, label, image, mask) -> loss``.
        unlabeled_data_loader: unlabeled slices (dicts with "image"); None trains supervised-only.
        unlabeled_optimizer: Adam over ``unlabeled_parameters(network)``.
        unlabeled_loss_function: ``UnlabeledLoss``: ``(image_pred, image) -> loss``.
        schedule, labeled_steps, unlabeled_steps, unlabeled_steps_per_epoch: see ``AlternatingLoader``.
        train_handlers: attached after the trainer's own epoch-loss bookkeeping, so StatsHandler and
            TensorBoard see ``train_labeled_loss`` / ``train_unlabeled_loss`` in ``state.metrics``.

    ``state.output`` holds image, label targets, label prediction, ``loss`` and ``phase``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        unlabeled_data_loader: Iterable | None = None,
        unlabeled_optimizer: Optimizer | None = None,
        unlabeled_loss_function: Callable | None = None,
        schedule: str = "blocks",
        labeled_steps: int = 1,
        unlabeled_steps: int = 1,
        unlabeled_steps_per_epoch: int | None = None,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        needs = (unlabeled_optimizer, unlabeled_loss_function)
        if unlabeled_data_loader is not None and any(x is None for x in needs):
            raise ValueError("unlabeled training needs unlabeled_optimizer and unlabeled_loss_function")
        loader = AlternatingLoader(
            train_data_loader,
            unlabeled_data_loader,
            schedule=schedule,
            labeled_steps=labeled_steps,
            unlabeled_steps=unlabeled_steps,
            unlabeled_steps_per_epoch=unlabeled_steps_per_epoch,
        )
        kwargs.setdefault("decollate", False)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch or PrepareSliceBatch(),
            train_handlers=None,
            **kwargs,
        )
        if self.accumulation_steps != 1:
            raise ValueError("gradient accumulation is not supported by the alternating trainer")
        self.labeled_data_loader = train_data_loader
        self.unlabeled_data_loader = loader.unlabeled
        self.unlabeled_optimizer = unlabeled_optimizer
        self.unlabeled_loss_function = unlabeled_loss_function
        self._loss_sums = torch.zeros(4, dtype=torch.float64)  # labeled sum, count, unlabeled sum, count
        self.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _epoch_started(self, engine: Engine) -> None:
        for sampler in self.data_loader.samplers():
            if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle per epoch
                sampler.set_epoch(engine.state.epoch)
        self._loss_sums.zero_()

    def _epoch_completed(self, engine: Engine) -> None:
        # A no-op in one process; under DDP Ignite moves the sums to the backend's device and back.
        sums = idist.all_reduce(self._loss_sums.clone())
        if sums[1] > 0:
            engine.state.metrics["train_labeled_loss"] = float(sums[0] / sums[1])
        if sums[3] > 0:
            engine.state.metrics["train_unlabeled_loss"] = float(sums[2] / sums[3])

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: dict[str, Any]) -> dict:
        """One labeled or unlabeled step, chosen by ``batchdata["phase"]``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        phase = batchdata.pop(PHASE_KEY, LABELED)
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if phase == LABELED and targets is None:
            raise ValueError("a labeled batch without 'label'")
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, PHASE_KEY: phase}
        optimizer = engine.optimizer if phase == LABELED else engine.unlabeled_optimizer
        engine.network.train()
        optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward_loss() -> torch.Tensor:
            if phase == LABELED:
                label_pred, image_pred = engine.inferer(inputs, engine.network)
                engine.state.output[Keys.PRED] = label_pred
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                mask = targets.get("mask")
                loss = engine.loss_function(label_pred, image_pred, targets["label"], inputs, mask)
            else:
                with image_only(engine.network):
                    image_pred = engine.inferer(inputs, engine.network)
                engine.state.output[Keys.PRED] = image_pred
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                loss = engine.unlabeled_loss_function(image_pred, inputs)
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return loss

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                loss = forward_loss()
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(optimizer)
            engine.scaler.update()
        else:
            loss = forward_loss()
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            optimizer.step()
        loss = loss.detach()
        engine.state.output[Keys.LOSS] = loss
        value = float(loss)
        if math.isfinite(value):
            offset = 0 if phase == LABELED else 2
            self._loss_sums[offset] += value
            self._loss_sums[offset + 1] += 1
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
