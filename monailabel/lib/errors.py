"""Find the project's own error inside the exceptions MONAI wraps it in.

The bundle's readers and weight loader raise ``VolumeError``/``WeightsError`` with a message naming the
file; when they run inside a config expression, MONAI re-raises them as ``RuntimeError: Failed to
evaluate ConfigExpression`` (the original is the ``__cause__``). The app answers with the original.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def find_cause(err: BaseException, types: tuple[type[E], ...]) -> E | None:
    """The first exception of ``types`` in ``err``'s chain (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
