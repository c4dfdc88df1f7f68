"""Which augmentation recipe a training run used: the ``recipe`` name checked against the settings.

The augmentations themselves are MONAI transforms listed in ``train#preprocessing`` of
``configs/train.json`` (zoom, blur, gamma, inversion, noise, intensity scale and shift), each switched
by its own ``aug_*_prob`` key; MONAI has a transform for every one of them, so no transform lives
here. What MONAI has no piece for is keeping the recipe's name honest and on record: a run labelled
``reference`` (the paper's recipe, ``configs/reference_recipe.json``) must have every added
augmentation off, and the name with every setting is written to ``output_dir/recipe.json`` so the
weights of a run can be traced to the recipe that made them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from scripts.io.atomic import atomic_output

__all__ = ["RECIPES", "RECIPE_FILE", "RecipeRecord", "check_recipe"]

logger = logging.getLogger(__name__)

RECIPES = ("robust", "reference")
RECIPE_FILE = "recipe.json"
REFERENCE_CONFIG = "configs/reference_recipe.json"


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a config value (tuples and numpy scalars from the parser included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def _is_range(value: list[Any]) -> bool:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        return False
    return 0.0 < low <= high


def check_recipe(recipe: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"recipe": name, **settings}`` after checking them: a known name, every ``*_prob`` in [0, 1],
    and all of them 0 for ``reference``. Raises ValueError naming the key and the fix."""
    name = str(recipe).strip().lower()
    if name not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    plain = _plain(dict(settings))
    probs = {k: v for k, v in plain.items() if k.endswith("_prob")}
    for key, value in probs.items():
        try:
            p = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} {value!r}: expected a probability between 0 and 1") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key} {value!r}: expected a probability between 0 and 1")
    for key, value in plain.items():
        if isinstance(value, list) and not _is_range(value):
            raise ValueError(f"{key} {value!r}: expected [low, high] with 0 < low <= high")
    switched_on = [f"{k}={v}" for k, v in probs.items() if float(v) > 0]
    if name == "reference" and switched_on:
        raise ValueError(
            f"recipe 'reference' with {', '.join(switched_on)}: the paper's recipe has none of these "
            f"augmentations; add the bundle's {REFERENCE_CONFIG} as a second config file (it sets "
            "them to 0) instead of --recipe reference, or keep --recipe robust"
        )
    return {"recipe": name, **plain}


class RecipeRecord:
    """Trainer handler: checks the recipe when the config builds it (every DDP rank, before any
    work) and writes it to ``output_dir/recipe.json`` when training starts (rank 0 keeps it; a
    resumed run rewrites it with the settings it continues with)."""

    def __init__(self, recipe: str, settings: Mapping[str, Any], output_dir: str | os.PathLike) -> None:
        self.record = check_recipe(recipe, settings)
        self.path = Path(output_dir) / RECIPE_FILE

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        logger.info("augmentation recipe %r (%s)", self.record["recipe"], self.path)
