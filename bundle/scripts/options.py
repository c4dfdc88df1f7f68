"""Options as they arrive from JSON configs, the command line or MONAI Label requests -> typed values.

One place for it: ``--tta false`` arrives as the string "false" (a plain ``bool("false")`` is True),
``--probability null`` as "null", ``--voxel_size_nm [20,9.8,9.8]`` maybe as a string. The configs and
MONAI Label convert with these functions where a value enters; the code behind them takes typed
values. Each raises ValueError naming the option. Imports nothing of the bundle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "as_bool",
    "as_choice",
    "as_names",
    "as_optional",
    "as_range",
    "as_voxel_size",
    "parse_slice_ranges",
]

T = TypeVar("T")

_TRUE = {"true", "yes", "y", "t", "1", "on"}
_FALSE = {"false", "no", "n", "f", "0", "off", "none", "null", ""}
_NULL = {"none", "null", ""}


def as_bool(value: object, name: str) -> bool:
    """``value`` as a bool; the strings "true"/"false" (yes/no, on/off, 1/0) count."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def as_optional(value: T | str | None) -> T | str | None:
    """None for None and the strings "none"/"null"/"" (any case); anything else unchanged."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
        return None
    return value


def as_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices`` (compared in lower case)."""
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return text


def _json_or_text(value: str) -> Any:
    """A list for "[1, 2]" / "(1, 2)" / "[glb, ply]" (unquoted names), else the stripped text."""
    text = value.strip()
    if text[:1] in "[(" and text[-1:] in ")]":
        try:
            return json.loads("[" + text[1:-1] + "]")
        except ValueError:
            return [item.strip() for item in text[1:-1].split(",") if item.strip()]
    return text


def as_voxel_size(value: object, name: str = "voxel_size_nm") -> float | tuple[float, float, float] | None:
    """None, one size in nm, or a (z, y, x) triple; also their string forms ("9.8", "[20,9.8,9.8]")."""
    value = as_optional(value)
    if value is None:
        return None
    if isinstance(value, str):
        value = _json_or_text(value)
    try:
        values = [float(value)] if isinstance(value, (int, float, str)) else [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be one number or (z, y, x) in nm, got {value!r}") from None
    if len(values) not in (1, 3):  # the sign and size are checked where a file's voxel size is set
        raise ValueError(f"{name} must be one number or (z, y, x) in nm, got {value!r}")
    return values[0] if len(values) == 1 else (values[0], values[1], values[2])


def as_range(value: object, name: str) -> tuple[int, int] | None:
    """None or a half-open ``[start, stop)`` pair of ints ("[0, 10]" and "0,10" as well)."""
    value = as_optional(value)
    if value is None:
        return None
    if isinstance(value, str):
        value = _json_or_text(value)
        value = value.split(",") if isinstance(value, str) else value
    try:
        start, stop = (int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be [start, stop), got {value!r}") from None
    return start, stop


def as_names(value: object, name: str, choices: Sequence[str] | None = None) -> list[str]:
    """A list of names from a list or a comma/semicolon-separated string, lower case, without
    duplicates, leading dots dropped ("ply, .STL" -> ["ply", "stl"]); None -> []."""
    value = as_optional(value)
    if value is None:
        return []
    if isinstance(value, str):
        value = _json_or_text(value)
        value = value.replace(";", ",").split(",") if isinstance(value, str) else value
    out: list[str] = []
    for item in value:  # type: ignore[union-attr]
        text = str(item).strip().lower().lstrip(".")
        if not text:
            continue
        if choices is not None and text not in choices:
            raise ValueError(f"unknown {name} {text!r}; choose from {list(choices)}")
        if text not in out:
            out.append(text)
    return out


def parse_slice_ranges(tokens: Iterable[object], n_slices: int) -> list[int]:
    """Sorted z indices from tokens that are ints or inclusive ranges ``a-b``.

    Raises ValueError naming the bad token; callers add where it came from.
    """
    found: set[int] = set()
    for token in tokens:
        first, _, last = str(token).strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"{token!r} is not a slice index or range a-b") from None
        if not 0 <= lo <= hi < n_slices:
            raise ValueError(f"{token!r} outside slices 0..{n_slices - 1}")
        found.update(range(lo, hi + 1))
    return sorted(found)
