"""The 8 symmetries of the square (rot90 k times, after an optional left-right flip) and their inverses.

Why a module of its own: test-time augmentation at inference (``scripts.infer.predict``) and the
teacher of adaptation's pseudo labels (``scripts.train.pseudo_labels``) average a network over the
same eight views, and the workflows never import each other. MONAI's ``TestTimeAugmentation`` draws
random transforms per call; these eight are exhaustive and exactly invertible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DIHEDRAL", "dihedral", "dihedral_inverse", "dihedral_mean"]

DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``x`` (..., H, W) flipped left-right (if ``flip``) then rotated by ``k`` quarter turns."""
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undoes ``dihedral(x, k, flip)``."""
    x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def dihedral_mean(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``function`` over the eight views of ``x`` (N, C, H, W), each mapped back."""
    total = None
    for k, flip in DIHEDRAL:
        out = dihedral_inverse(function(dihedral(x, k, flip)), k, flip)
        total = out if total is None else total + out
    return total / len(DIHEDRAL)
