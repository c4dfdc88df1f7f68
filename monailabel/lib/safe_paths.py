"""Names from HTTP requests (image ids, label tags) and the paths made from them.

MONAI Label joins request strings into file paths (``STUDIES/<id><ext>``, ``STUDIES/labels/<tag>/``),
so an id such as ``../x`` or ``/abs/x`` would read, write or delete outside the studies folder. A new
id or tag must therefore be a plain name from a small character set, and every path is resolved
(symbolic links followed) and checked to lie inside its folder before it is read, written or deleted.

No MONAI Label or FastAPI import: the app, the training-data linker and the tests share these rules.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Letters, digits, '.', '_' and '-', starting with a letter or digit (so never '.', '..' or '-x').
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1 to 128 of the characters A-Z a-z 0-9 . _ -, starting with a letter or a digit"


class UnsafePathError(ValueError):
    """A request name that is not a plain name, or a path that leaves its folder."""


def is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def check_plain_name(name: Any, what: str) -> str:
    """``name`` if it is a plain name, else UnsafePathError saying which rule it breaks."""
    if not is_plain_name(name):
        raise UnsafePathError(f"{what} {name!r} is not a plain name (use {NAME_RULE})")
    return name


def inside(path: str | os.PathLike, folder: str | os.PathLike, what: str) -> Path:
    """``path`` resolved; UnsafePathError unless it lies inside ``folder`` (also resolved)."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise UnsafePathError(f"{what}: {path} resolves to {resolved}, outside {root}")
    return resolved


def is_link_name(name: str) -> bool:
    """Whether ``name`` can name a file directly inside a folder (no separator, not '.'/'..', no NUL)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0"))
