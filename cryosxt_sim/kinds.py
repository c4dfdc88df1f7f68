"""Cell kinds and per-tomogram sample settings of the cryo-SXT phantoms.

Why numbers in one place: the kinds share one builder (``phantom``, with ``yeast`` for walled
cells); what makes a mammalian cell, a yeast cell or a crowded section different is mostly sizes,
counts and probabilities, kept here side by side. ``Sample`` is what a tomogram's phantom is made
of beyond its kind (organelle density, ice, background, appearance); the default ``Sample()`` is
the mammalian phantom the presets have always drawn, random number for random number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BACKGROUNDS", "KINDS", "CellKind", "Sample", "draw_sample"]

BACKGROUNDS = ("flat", "carbon", "gold")


@dataclass(frozen=True)
class CellKind:
    """Geometry and organelle statistics of one kind of cell (sizes in nm, densities per um^2)."""

    name: str
    layout: str = "flat"  # "flat": flattened cells sized to the field of view; "walled": yeast (``yeast``)
    p_sectioned: float = 0.5  # chance the volume is a section through a thicker cell
    whole_min_nm: float = 250.0  # volumes thinner than this are always sections
    p_two: float = 0.3  # flat layout: chance of two cells
    radius_one: tuple[float, float] = (0.5, 0.9)  # flat layout: radius / field-of-view side, one cell
    dist_one: tuple[float, float] = (0.2, 0.9)  # centre offset from the FOV centre / radius, one cell
    filopodia: bool = True
    radius_nm: tuple[float, float] = (1500.0, 2800.0)  # walled layout: cell radius (log-uniform)
    wall_nm: tuple[float, float] = (0.0, 0.0)  # walled layout: cell-wall thickness
    vacuoles: float = 0.0  # walled layout: mean number of vacuoles per cell beyond the first
    p_nucleus: float = 0.7
    nucleus_frac: tuple[float, float] = (0.35, 0.55)  # nucleus radius / cell radius
    mito_length_nm: tuple[float, float] = (300.0, 1000.0)  # semi-axes of the ellipsoid
    mito_width_nm: tuple[float, float] = (110.0, 220.0)
    vesicle_nm: tuple[float, float] = (30.0, 160.0)  # radius, log-uniform
    droplet_nm: tuple[float, float] = (80.0, 300.0)  # radius
    density: dict[str, float] = field(
        default_factory=lambda: {"mitochondrion": 0.8, "vesicle": 5.0, "droplet": 0.4, "er": 1.5, "granule": 40.0}
    )


KINDS: dict[str, CellKind] = {
    "mammalian": CellKind("mammalian"),
    # Yeast-like: round walled cells of physical size, a few large vacuoles, many lipid droplets.
    "yeast": CellKind(
        "yeast",
        layout="walled",
        p_sectioned=0.6,
        whole_min_nm=2600.0,
        filopodia=False,
        wall_nm=(80.0, 200.0),
        vacuoles=0.8,
        p_nucleus=0.8,
        nucleus_frac=(0.28, 0.4),
        mito_length_nm=(250.0, 700.0),
        mito_width_nm=(100.0, 170.0),
        droplet_nm=(80.0, 220.0),
        density={"mitochondrion": 0.6, "vesicle": 3.0, "droplet": 1.2, "er": 1.0, "granule": 40.0},
    ),
    # Crowded cytoplasm: a section inside one large cell, packed with small vesicles and ER tubules.
    "crowded": CellKind(
        "crowded",
        p_sectioned=1.0,
        p_two=0.0,
        radius_one=(1.3, 2.2),
        dist_one=(0.4, 1.05),
        filopodia=False,
        p_nucleus=0.3,
        vesicle_nm=(22.0, 90.0),
        density={"mitochondrion": 0.6, "vesicle": 40.0, "droplet": 0.3, "er": 6.0, "granule": 80.0},
    ),
}


@dataclass(frozen=True)
class Sample:
    """What one tomogram's phantom is made of beyond the instrument (recorded in its JSON info)."""

    cell: str = "mammalian"  # a key of KINDS
    density: float = 1.0  # scale on the kind's organelle densities
    ice_ratio: float | None = None  # ice slab / volume thickness; None: the phantom draws 0.8-1.3
    background: str = "flat"  # flat ice, "carbon" (holey carbon support film) or "gold" (beads)
    varied: bool = False  # appearance drawn per organelle (matrix density, cristae, droplet LAC)
    cytoplasm_lac: float | None = None  # 1/um; None: the LAC table's
    membrane_lac: float | None = None

    def __post_init__(self) -> None:
        if self.cell not in KINDS:
            raise ValueError(f"unknown cell kind {self.cell!r}; choose from {sorted(KINDS)} or 'random'")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {BACKGROUNDS}")

    def lac_overrides(self) -> dict[str, float]:
        out = {"cytoplasm": self.cytoplasm_lac, "membrane": self.membrane_lac}
        return {k: v for k, v in out.items() if v is not None}


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_sample(rng: np.random.Generator, cell: str | None = None) -> Sample:
    """A random sample: kind (unless given), density 0.5-2x, ice 0.7-1.5x the volume, background,
    and varied appearance. Ranges in docs/simulator.md."""
    kind = str(rng.choice(sorted(KINDS)))
    if cell not in (None, "random"):
        kind = str(cell)
    background = str(rng.choice(BACKGROUNDS, p=[0.4, 0.3, 0.3]))
    return Sample(
        cell=kind,
        density=round(_log_uniform(rng, 0.5, 2.0), 3),
        ice_ratio=round(float(rng.uniform(0.7, 1.5)), 3),
        background=background,
        varied=True,
        cytoplasm_lac=round(float(rng.uniform(0.26, 0.36)), 3),
        membrane_lac=round(float(rng.uniform(0.65, 0.9)), 3),
    )
