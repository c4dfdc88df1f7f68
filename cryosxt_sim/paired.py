"""The same phantom simulated at two voxel sizes, for the voxel-size target of the generalisation
benchmark (Dice at 9.8 nm and at 19.6 nm must agree).

Why a mode of its own: an ordinary simulation at another voxel size draws another cell, because
some random draws depend on the grid (noise fields as large as the grid, area rasters, padding), so
a Dice gap between the two would mix the network's voxel-size sensitivity with a different phantom.
Here both grids cover the same field of view in nm, share padding in nm and draw their geometry
from one stream (``PairedLayout``). The coarse tomogram is what binning the detector by ``factor``
gives: the same photons per nm^2 (dose per pixel times factor^2), PSF, tilts and reconstruction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cryosxt_sim.instruments import Instrument, resolve
from cryosxt_sim.kinds import Sample
from cryosxt_sim.phantom import PairedLayout
from cryosxt_sim.simulate import SimulatedTomogram, padding, simulate_tomogram

__all__ = ["TEXTURE_STREAM", "simulate_pair"]

TEXTURE_STREAM = 0x7E87  # appended to the tomogram's seed: the paired phantoms' noise stream


def simulate_pair(
    shape: Sequence[int],
    instrument: str | Instrument = "bessy",
    seed: int | Sequence[int] = 0,
    cell: str | Sample | None = None,
    factor: int = 2,
) -> tuple[SimulatedTomogram, SimulatedTomogram]:
    """(fine, coarse): `shape` at the instrument's voxel size and shape / factor at factor times it.

    Objects (kinds, centres, sizes in nm) are the same in both, to well under a coarse voxel; every
    side of `shape` must be a multiple of `factor`.
    """
    shape = tuple(int(s) for s in shape)
    if factor < 2 or any(s % factor for s in shape) or min(shape) // factor < 8:
        raise ValueError(f"shape {shape} must be a multiple of factor {factor} with sides >= {8 * factor}")
    inst, sample = resolve(instrument, seed, cell)
    coarse_inst = dataclasses.replace(inst, voxel_size_nm=inst.voxel_size_nm * factor, dose=inst.dose * factor**2)
    coarse_shape = tuple(s // factor for s in shape)
    pz, px = padding(coarse_shape, coarse_inst, sample)  # padding in nm of the coarse grid, both grids
    vc = coarse_inst.voxel_size_nm
    grid = (coarse_shape[0] + 2 * pz, coarse_shape[1], coarse_shape[2] + 2 * px)
    shared = {
        "extent_nm": tuple((n - 1) * vc for n in grid),
        "draw_voxel_nm": vc,
        "area_step_nm": max(4 * vc, 40.0),
        "texture_seed": (*(int(s) for s in np.atleast_1d(seed)), TEXTURE_STREAM),
    }
    fine_layout = PairedLayout((factor * pz, factor * px), **shared)
    coarse_layout = PairedLayout((pz, px), **shared)
    fine = simulate_tomogram(shape, inst, seed, sample, layout=fine_layout)
    coarse = simulate_tomogram(coarse_shape, coarse_inst, seed, sample, layout=coarse_layout)
    return fine, coarse
