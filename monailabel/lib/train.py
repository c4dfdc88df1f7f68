"""MONAI Label training task: the bundle's semi-supervised trainer on the datastore's tomograms.

``BundleTrainTask`` hands the bundle a list of (image, label) volume pairs as ``train#dataset#data``.
This bundle trains on slices: its ``data_split`` reads a dataset folder and yields annotated labeled
slices (with a validation split) and every slice of the unlabeled tomograms, which feed the
reconstruction branch. So instead of overriding the data lists, this task writes the datastore as
such a folder (symlinks; see ``training_data``), points ``dataset_dir`` at it and drops the list
overrides. Everything else is the stock task: device, ``max_epochs``, ``CheckpointLoader`` from
``models/model.pt`` (fine-tuning), ``monai.bundle.run``.

The bundle saves its best model (validation key metric) and ``last.pt`` in ``output_dir``; when the
run ends the weights are published atomically to ``models/<model_filename>``, where the inference
task picks them up (it reloads when the file changes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import device_list

from .request_options import (
    TRAIN_IGNORED,
    Spec,
    device_choices,
    parse_options,
    refuse_expressions,
    train_options,
)
from .training_data import build_training_folder
from .weights import publish_weights

logger = logging.getLogger(__name__)

RUN_DIR = "runs/monailabel"
STATS_FILE = "runs/monailabel_stats.json"

# Request option -> train.json key, for the options passed straight to the bundle.
BUNDLE_OPTIONS = {
    "semi_supervised": "semi_supervised",
    "patch_size": "patch_size",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "labeled_repeats": "labeled_repeats",
    "unlabeled_steps_per_epoch": "unlabeled_steps_per_epoch",
    "num_workers": "num_workers",
    "early_stop_patience": "early_stop_patience",
    "seed": "seed",
}
# Stock options that do not apply here (no MLflow in this environment; DDP is the bundle's own job).
DROPPED_OPTIONS = ("tracking", "tracking_uri", "tracking_experiment_name", "run_id")
# Request keys MONAI Label itself sets (the model name, the bundle path for the task's PYTHONPATH, the
# task process's rank); dropped before the options are parsed (a client's copy too).
INTERNAL_KEYS = ("model", "bundle_path", "local_rank")


class SemiSupervisedTrain(BundleTrainTask):
    """Train the double-decoder network from MONAI Label's datastore.

    Labeled tomograms: studies with a ``final`` label; only their annotated slices are used (255 =
    not annotated, or the slices with membrane for 0/1 labelmaps; see ``training_data``). Unlabeled
    tomograms: all other studies, for the reconstruction branch (``semi_supervised``).
    """

    def __init__(
        self, bundle_path: str | os.PathLike, conf: dict[str, str], inference_width: int | None = None
    ) -> None:
        super().__init__(str(bundle_path), conf, model_dict_key="model", load_strict=True)
        self.inference_width = inference_width
        self._request: dict[str, Any] = {}
        self._dataset_dir: Path | None = None
        self._summary: dict[str, Any] = {"labeled": [], "unlabeled": [], "skipped": {}}

    # ------------------------------------------------------------------ options

    def _bundle_value(self, key: str, default: Any = None) -> Any:
        value = self.bundle_config.config.get(key, default) if self.valid else default  # type: ignore[union-attr]
        return default if isinstance(value, str) and value.startswith(("$", "@")) else value

    def config(self) -> dict[str, Any]:
        options = super().config()
        for key in DROPPED_OPTIONS:
            options.pop(key, None)
        options.update(
            {
                "max_epochs": 50,
                "val_split": float(self._bundle_value("val_fraction", 0.1)),
                "multi_gpu": False,
            }
        )
        for option, key in BUNDLE_OPTIONS.items():
            if self.valid and key in self.bundle_config.config:
                value = self._bundle_value(key)
                # Slicer's option table needs a typed value: None ("all unlabeled slices") is shown as 0.
                options[option] = 0 if value is None and option == "unlabeled_steps_per_epoch" else value
        return options

    def option_schema(self) -> dict[str, Spec]:
        """The options a /train request may carry (request_options); the weights choice is re-read
        from models/*.pt at each request, so an uploaded or newly trained file can be chosen."""
        import torch

        found = {p.name for p in (Path(self.bundle_path) / "models").glob("*.pt")}
        models = sorted(found | {"model.pt"}, key=len)  # model.pt: the name a first training writes
        return train_options(models, device_choices(device_list(), torch.cuda.device_count()))

    def checked_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """``request`` with its options parsed to their types (OptionError if one is bad)."""
        options = {k: v for k, v in request.items() if k not in INTERNAL_KEYS}
        typed = parse_options(options, self.option_schema(), TRAIN_IGNORED)
        return {**typed, **({"model": request["model"]} if "model" in request else {})}

    def stats(self) -> dict[str, Any]:
        path = Path(self.bundle_path) / STATS_FILE
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if "total_time" not in stats:  # running: report the epochs done so far
            stats.update(self._history_summary(Path(self.bundle_path) / RUN_DIR))
        return stats

    def _history_summary(self, run_dir: Path) -> dict[str, Any]:
        key = str(self._bundle_value("key_metric", "f1"))
        epoch, best, best_epoch = 0, 0.0, 0
        try:
            lines = (run_dir / "history.jsonl").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            epoch = max(epoch, int(record.get("epoch", 0)))
            value = record.get(f"val_{key}", record.get(key))  # the bundle's metrics are "val_<name>"
            if value is not None and float(value) >= best:
                best, best_epoch = float(value), int(record.get("epoch", 0))
        return {"epoch": epoch, "best_metric": best, "best_metric_epoch": best_epoch, "key_metric": key}

    # ------------------------------------------------------------------ BundleTrainTask hooks

    def _fetch_datalist(self, request: dict[str, Any], datastore: Any) -> list[dict[str, str]]:
        assert self._dataset_dir is not None
        studies = getattr(datastore, "studies", None)  # a local datastore's folder: only files inside it
        summary = build_training_folder(datastore, self._dataset_dir, studies=studies)
        self._summary = summary
        logger.info(
            "training data: %d labeled, %d unlabeled tomograms; skipped: %s",
            len(summary["labeled"]),
            len(summary["unlabeled"]),
            summary["skipped"] or "none",
        )
        if not summary["labeled"]:
            raise ValueError(
                "no labeled tomogram in the datastore: save a label with annotated slices first "
                f"(PUT /datastore/label); skipped: {summary['skipped'] or 'none'}"
            )
        return [{"image": i, "label": i} for i in summary["labeled"]]

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple:
        return datalist, None  # the bundle's data_split makes the validation split (by file or slice)

    def _load_checkpoint(self, model_pytorch: str, pretrained: Any, train_handlers: list) -> None:
        # The stock task calls os.path.exists(None) when pretrained is false.
        from scripts.options import as_bool

        if as_bool(pretrained, "pretrained") and os.path.isfile(model_pytorch):
            super()._load_checkpoint(model_pytorch, True, train_handlers)

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides.pop(self.const.key_train_dataset_data(), None)
        overrides.pop(self.const.key_validate_dataset_data(), None)
        request, config = self._request, self.bundle_config.config
        overrides["dataset_dir"] = str(self._dataset_dir)
        overrides["output_dir"] = str(Path(self.bundle_path) / RUN_DIR)
        overrides["width"] = self._width(request)
        val_split = float(request.get("val_split", -1))
        if val_split >= 0:  # < 0: keep the bundle's val_fraction
            overrides["val_fraction"] = val_split
        for option, key in BUNDLE_OPTIONS.items():
            if option in request and key in config:
                value = request[option]
                if option == "unlabeled_steps_per_epoch" and int(value or 0) <= 0:
                    value = None
                overrides[key] = value
        for key, value in (("progress_bar", False), ("resume", False)):
            if key in config:
                overrides[key] = value  # a tqdm bar garbles the task log; each run starts afresh
        shown = {k: v for k, v in overrides.items() if k != "train#handlers"}  # stock "$@network" inside
        refuse_expressions(shown)  # the request was parsed to plain values; this holds it at the parser
        logger.info("bundle overrides: %s", shown)
        return overrides

    def _width(self, request: dict[str, Any]) -> int:
        """Network width: the checkpoint's when fine-tuning, else inference.json's explicit width, else
        that of the bundle's ``models/model.pt`` (which inference.json reads by default)."""
        from scripts.options import as_bool

        models = Path(self.bundle_path) / "models"
        if as_bool(request.get("pretrained", True), "pretrained"):
            width = _file_width(models / self._model_filename(request))
            if width is not None:
                return width
        if self.inference_width:
            return int(self.inference_width)
        width = _file_width(models / "model.pt")
        return width if width is not None else int(self._bundle_value("width") or 64)  # null: the paper's 64

    @staticmethod
    def _model_filename(request: dict[str, Any]) -> str:
        name = request.get("model_filename") or "model.pt"
        return os.path.basename(name if isinstance(name, str) else name[0])

    # ------------------------------------------------------------------ run

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        from scripts.options import as_bool

        # Parsed again here (the server parsed it before starting this process): whatever path a
        # request takes, only typed values go on. The defaults from config() are the app's own.
        request = {**self.config(), **self.checked_request(request)}
        for key in ("device", "model_filename"):
            if isinstance(request.get(key), list):
                request[key] = request[key][0] if request[key] else None
        request["multi_gpu"] = as_bool(request.get("multi_gpu", False), "multi_gpu")
        self._request = request
        self._summary = {"labeled": [], "unlabeled": [], "skipped": {}}
        run_dir = Path(self.bundle_path) / RUN_DIR
        shutil.rmtree(run_dir, ignore_errors=True)  # "model.pt in run_dir" must mean "from this run"
        run_dir.mkdir(parents=True)
        stats_path = Path(self.bundle_path) / STATS_FILE
        start = time.time()
        self._write_stats(
            stats_path,
            {
                "total_epochs": int(request.get("max_epochs", 50)),
                "start_ts": int(start),
                "epoch": 0,
                "best_metric": 0.0,
            },
        )
        self._dataset_dir = Path(tempfile.mkdtemp(prefix="cryosxt-monailabel-train-"))
        stats: dict[str, Any] = {"total_epochs": int(request.get("max_epochs", 50)), "start_ts": int(start)}
        try:
            result = super().__call__(request, datastore)
            target = Path(self.bundle_path) / "models" / self._model_filename(request)
            source = self._publish(run_dir, target)
            stats.update(published=f"models/{target.name}", published_from=source.name)
        except Exception as err:
            stats["error"] = f"{type(err).__name__}: {err}"  # "total_time" below: clients see it ended
            raise
        finally:
            shutil.rmtree(self._dataset_dir, ignore_errors=True)
            self._dataset_dir = None
            stats.update(
                total_time=round(time.time() - start, 1),
                **self._history_summary(run_dir),
                labeled=self._summary["labeled"],
                unlabeled=self._summary["unlabeled"],
                skipped=self._summary["skipped"],
            )
            self._write_stats(stats_path, stats)
        logger.info("training done: %s", stats)
        return {**(result or {}), **stats}

    @staticmethod
    def _write_stats(path: Path, stats: dict[str, Any]) -> None:
        from scripts.io.atomic import atomic_output

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(stats, indent=2))

    @staticmethod
    def _publish(run_dir: Path, target: Path) -> Path:
        """Copy the run's best model (else its last epoch) to ``target`` (weights_only loading)."""
        return publish_weights(run_dir, target)


def _file_width(path: Path) -> int | None:
    """The network width a weights file holds; None when there is no file or it is foreign."""
    from scripts.network.weights import WeightsError, weights_info

    if not path.is_file():
        return None
    try:
        return weights_info(path).width
    except WeightsError as err:  # the CheckpointLoader will say more
        logger.warning("width of %s unknown: %s", path, err)
        return None
