"""The bundle's file layer, through which the simulator writes its tomograms.

Why not a writer of its own: the simulator makes the bundle's demo, training and test data, so its
files must be exactly what the bundle reads (uint8 MRC with IMOD's unsigned flag, the voxel size in
MRC, TIFF and NIfTI headers, crash-safe renames). Using the bundle's ``scripts.io`` keeps one
implementation of that. The bundle is not an installed package (MONAI bundles import ``scripts``
from the bundle folder), so when ``scripts`` is not importable already (as it is under pytest or
MONAI Label) the folder is ``$CRYOSXT_BUNDLE`` or else ``bundle/`` beside this package in the
repository, and it is put at the front of ``sys.path`` on first use, not at import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["bundle_module"]


def _bundle_dir() -> Path:
    return Path(os.environ.get("CRYOSXT_BUNDLE") or Path(__file__).resolve().parent.parent / "bundle")


def bundle_module(name: str) -> ModuleType:
    """The bundle module ``scripts.<name>`` (e.g. ``io.volume``), importing the bundle if needed."""
    import importlib

    try:
        return importlib.import_module(f"scripts.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("scripts", f"scripts.{name.partition('.')[0]}"):
            raise
    root = _bundle_dir()
    top = root / "scripts" / name.partition(".")[0]
    if not ((top / "__init__.py").is_file() or top.with_suffix(".py").is_file()):
        raise ModuleNotFoundError(
            f"the simulator writes through the bundle's scripts.{name}, which is not at {root}; "
            "set CRYOSXT_BUNDLE to the bundle folder"
        )
    sys.path.insert(0, str(root))
    return importlib.import_module(f"scripts.{name}")
