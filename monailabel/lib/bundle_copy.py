"""The app's working copy of the bundle: ``<app>/model/<bundle name>``.

MONAI Label trains into the bundle it serves, so the app never serves the repository's ``bundle/``
in place (a retrain would overwrite the shipped ``models/model.pt``). At every start the configs,
scripts and docs are synced from the source bundle (so code changes reach the server); the weights
are copied only when the working copy has none, so a model trained through MONAI Label survives
restarts.
"""

from __future__ import annotations

import filecmp
import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SYNCED_DIRS = ("configs", "scripts", "docs")
SYNCED_FILES = ("LICENSE",)
IGNORED = {"__pycache__", ".pytest_cache"}


class BundleError(RuntimeError):
    """The source bundle is missing or incomplete."""


def bundle_name(source: str | Path) -> str:
    """The MONAI Label model name (and working-copy folder): the ``name`` of ``configs/metadata.json``
    in lower case, spaces to underscores, other characters dropped. The model zoo wants a display
    name there ("Cryo-SXT membrane segmentation"); URLs and folders want ``cryosxt_membrane_segmentation``."""
    meta = Path(source) / "configs" / "metadata.json"
    if not meta.is_file():
        raise BundleError(f"{source}: not a MONAI bundle (no configs/metadata.json)")
    display = str(json.loads(meta.read_text())["name"])
    name = "_".join(re.sub(r"[^a-z0-9_ ]", "", display.lower()).split())
    if not re.search(r"[a-z0-9]", name):
        raise BundleError(f"{meta}: name {display!r} has no letters or digits to name the model by")
    return name


def _sync_tree(src: Path, dst: Path) -> int:
    """Make ``dst`` a copy of ``src`` (files compared by content); return the number of changes."""
    changes = 0
    dst.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in src.iterdir() if p.name not in IGNORED}
    for stale in dst.iterdir():
        if stale.name not in wanted and stale.name not in IGNORED:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            changes += 1
    for item in sorted(src.iterdir()):
        if item.name in IGNORED:
            continue
        target = dst / item.name
        if item.is_dir():
            changes += _sync_tree(item, target)
        elif not target.is_file() or not filecmp.cmp(item, target, shallow=False):
            shutil.copy2(item, target)
            changes += 1
    return changes


def prepare_working_bundle(source: str | Path, model_root: str | Path, reset_weights: bool = False) -> Path:
    """Create or refresh ``model_root/<name>`` from the bundle at ``source``; return its path."""
    source = Path(source).resolve()
    for needed in ("configs/inference.json", "scripts/__init__.py"):
        if not (source / needed).is_file():
            raise BundleError(f"{source}: not this project's bundle (missing {needed})")
    dest = Path(model_root) / bundle_name(source)
    if dest.resolve() == source:
        raise BundleError(f"{dest}: the working copy cannot be the source bundle itself")
    changes = sum(_sync_tree(source / d, dest / d) for d in SYNCED_DIRS if (source / d).is_dir())
    for name in SYNCED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    models = dest / "models"
    models.mkdir(parents=True, exist_ok=True)
    shipped = sorted((source / "models").glob("*.pt")) if (source / "models").is_dir() else []
    for weights in shipped:
        target = models / weights.name
        if reset_weights or not target.exists():
            shutil.copy2(weights, target)
            # The weights' metadata sidecar (the voxel size they were trained at) goes with them; its
            # name is scripts.io.weights_metadata.metadata_path's (the bundle is not imported here).
            sidecar, target_sidecar = (p.with_name(p.name + ".json") for p in (weights, target))
            if sidecar.is_file():
                shutil.copy2(sidecar, target_sidecar)
            else:
                target_sidecar.unlink(missing_ok=True)
            logger.info("copied weights %s -> %s", weights, target)
    if not (models / "model.pt").exists():
        logger.warning(
            "%s has no models/model.pt: inference is unavailable until a model is trained "
            "(POST /train) or uploaded (PUT /model)",
            dest,
        )
    logger.info("working bundle %s (%d file(s) refreshed from %s)", dest, changes, source)
    return dest
