"""Checks for options that arrive from JSON configs or the command line."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off", "none", "null", ""}


def as_bool(value: object, name: str) -> bool:
    """``value`` as a bool; the strings "true"/"false" count (``--tta false`` arrives as a string).

    A plain ``bool("false")`` is True, which would silently turn an option on.
    """
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)
