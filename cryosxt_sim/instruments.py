"""Instruments of the cryo-SXT simulator: named presets, a ``random`` one drawn per tomogram, and
the held-out corner of the random space that no draw lands in.

Why drawing is separate from simulating: a study (training on ``random``, testing on ``heldout``)
must be able to list what each seed draws, and a test must be able to prove over thousands of seeds
that the draw never enters the held-out corner, without simulating a single tomogram. The draw uses
a random stream of its own (the tomogram's seed plus ``DRAW_STREAM``), so drawing does not shift
the phantom's or the detector's random numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryosxt_sim.kinds import KINDS, Sample, draw_sample

__all__ = [
    "HELD_OUT",
    "INSTRUMENTS",
    "RANDOM",
    "Instrument",
    "draw_instrument",
    "draw_rng",
    "get_instrument",
    "in_held_out",
    "resolve",
]

RANDOM = "random"
DRAW_STREAM = 0x5E7D  # appended to the tomogram's seed: the draw's own random stream
MAX_SIRT_WORK = 2000  # random draws: projections x SIRT iterations at most (bessy: 131 x 20 = 2620)


@dataclass(frozen=True)
class Instrument:
    """Acquisition and reconstruction settings of one beamline (see docs/simulator.md)."""

    name: str
    voxel_size_nm: float
    tilt_max_deg: float
    tilt_step_deg: float
    psf_fwhm_nm: float  # zone-plate resolution, Gaussian PSF on the detector
    dose: float  # incident photons per detector pixel per projection (0: noiseless)
    polarity: int  # +1: absorption bright; -1: inverted ("transmission-like", dense = dark)
    iterations: int  # SIRT iterations
    jitter_px: float = 0.3  # residual alignment error per projection (std, pixels)
    flux_jitter: float = 0.01  # relative beam-flux error per projection
    fiducials: tuple[int, int] = (0, 0)  # min/max gold beads on the ice surfaces


INSTRUMENTS: dict[str, Instrument] = {
    "bessy": Instrument("bessy", 9.8, 65.0, 1.0, 30.0, 800.0, 1, 20),
    "mistral": Instrument("mistral", 13.0, 60.0, 1.0, 38.0, 500.0, -1, 20, jitter_px=0.5, flux_jitter=0.02),
    "b24": Instrument("b24", 20.0, 60.0, 2.0, 50.0, 2000.0, 1, 25, jitter_px=0.4, fiducials=(0, 2)),
    "labsource": Instrument("labsource", 35.0, 60.0, 2.0, 80.0, 300.0, -1, 15, jitter_px=0.5, flux_jitter=0.03),
    # Inside the held-out corner: a lab source with a coarse zone plate and a flat holder.
    "heldout": Instrument("heldout", 32.0, 56.0, 2.0, 75.0, 250.0, -1, 15, jitter_px=0.5, flux_jitter=0.03),
}

HELD_OUT = (
    "polarity -1 (dense dark) and voxel >= 28 nm and PSF FWHM >= 70 nm and tilt range <= +/-58 deg: "
    "never drawn by 'random'"
)


def in_held_out(inst: Instrument) -> bool:
    """Whether `inst` lies in the held-out corner (HELD_OUT) of the random instrument's space."""
    return inst.polarity < 0 and inst.voxel_size_nm >= 28.0 and inst.psf_fwhm_nm >= 70.0 and inst.tilt_max_deg <= 58.0


def get_instrument(instrument: str | Instrument, **overrides) -> Instrument:
    """A preset by name (or an Instrument), with non-None overrides applied."""
    if isinstance(instrument, str):
        if instrument not in INSTRUMENTS:
            choices = sorted(INSTRUMENTS) + [RANDOM]
            raise ValueError(f"unknown instrument {instrument!r}; choose from {choices}")
        instrument = INSTRUMENTS[instrument]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(instrument, **changes) if changes else instrument


def draw_rng(seed: int | Sequence[int]) -> np.random.Generator:
    """The draw's random stream for a tomogram seed (an int or a sequence of ints)."""
    return np.random.default_rng([*(int(s) for s in np.atleast_1d(seed)), DRAW_STREAM])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_instrument(rng: np.random.Generator) -> Instrument:
    """One random instrument outside the held-out corner (ranges in docs/simulator.md).

    Resolution follows the voxel size: the PSF FWHM is 1-3 voxels and 25-80 nm. Fine tilt steps get
    fewer SIRT iterations (projections x iterations <= MAX_SIRT_WORK), which keeps the time of a
    tomogram near a preset's. Draws in the held-out corner are redrawn (about 0.4 % of them).
    """
    while True:
        polarity = 1 if rng.random() < 0.5 else -1
        voxel = round(_log_uniform(rng, 10.0, 40.0), 2)
        psf = round(_log_uniform(rng, max(25.0, voxel), min(80.0, 3.0 * voxel)), 1)
        dose = round(_log_uniform(rng, 150.0, 3000.0))
        tilt = round(float(rng.uniform(55.0, 70.0)), 1)
        step = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0]))
        n_proj = 2 * int(math.floor(tilt / step + 1e-6)) + 1
        iterations = min(int(rng.integers(10, 41)), MAX_SIRT_WORK // n_proj)
        inst = Instrument(
            RANDOM,
            voxel,
            tilt,
            step,
            psf,
            float(dose),
            polarity,
            iterations,
            jitter_px=round(float(rng.uniform(0.1, 0.6)), 2),
            flux_jitter=round(float(rng.uniform(0.005, 0.03)), 3),
        )
        if not in_held_out(inst):
            return inst


def resolve(
    instrument: str | Instrument, seed: int | Sequence[int], cell: str | Sample | None = None, **overrides
) -> tuple[Instrument, Sample]:
    """The instrument and sample of the tomogram with this seed.

    instrument: a preset name, ``"random"`` (drawn from the seed) or an Instrument. cell: None (the
    preset's mammalian cell; drawn under ``random``), a kind name, ``"random"`` (kind drawn from the
    seed) or a Sample (used as is). Non-None overrides replace instrument fields after the draw.
    """
    if isinstance(cell, str) and cell != RANDOM and cell not in KINDS:
        raise ValueError(f"unknown cell kind {cell!r}; choose from {sorted(KINDS) + [RANDOM]}")
    rng = draw_rng(seed)
    inst = draw_instrument(rng) if instrument == RANDOM else get_instrument(instrument)
    if isinstance(cell, Sample):
        sample = cell
    elif instrument == RANDOM:
        sample = draw_sample(rng, cell)
    elif cell == RANDOM:
        sample = Sample(cell=draw_sample(rng).cell)
    else:
        sample = Sample(cell=cell or "mammalian")
    return get_instrument(inst, **overrides), sample
