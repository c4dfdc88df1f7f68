"""Simulated cryo-SXT tomograms with exact membrane ground truth, for demos, tests and benchmarks.

    python -m cryosxt_sim --out D --count 2 --shape 32,128,128 --seed 0 --instrument bessy
    python -m cryosxt_sim --out D --count 8 --instrument random            # drawn per tomogram
    python -m cryosxt_sim --out D --count 2 --instrument b24 --cell yeast

writes D/images/NAME.mrc, D/labels/NAME.mrc (uint8 0/1), D/instances/NAME.mrc + NAME.json and,
with --unlabeled K, K more tomograms in D/unlabeled/. Physics, presets, the random ranges and the
held-out corner: docs/simulator.md. ``--out`` is required (no default folder, so nothing lands beside
the code by accident), and the options are checked before any simulation starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryosxt_sim.bundle_io import bundle_module
from cryosxt_sim.instruments import (
    HELD_OUT,
    INSTRUMENTS,
    Instrument,
    get_instrument,
    in_held_out,
    resolve,
)
from cryosxt_sim.kinds import KINDS, Sample
from cryosxt_sim.phantom import PairedLayout, build_phantom
from cryosxt_sim.tomography import acquire, reconstruct, tilt_angles

__all__ = [
    "HELD_OUT",
    "INSTRUMENTS",
    "KINDS",
    "Instrument",
    "Sample",
    "SimulatedTomogram",
    "get_instrument",
    "in_held_out",
    "main",
    "resolve",
    "simulate_tomogram",
]


@dataclass
class SimulatedTomogram:
    """A reconstructed tomogram with its exact ground truth (all arrays (z, y, x))."""

    image: np.ndarray  # float32
    membrane: np.ndarray  # uint8 0/1
    instances: np.ndarray  # uint16, 0 = ice/background
    objects: list[dict]
    voxel_size_nm: float
    instrument: str
    info: dict


def padding(shape: tuple[int, int, int], inst: Instrument, sample: Sample | None = None) -> tuple[int, int]:
    """(z, x) padding in voxels so every ray reaching the detector crosses the whole slab."""
    nz, _, nx = shape
    pz = int(math.ceil(0.25 * nz)) + 2
    if sample is not None and sample.ice_ratio is not None:  # thick ice, its support film and beads fit
        beyond = (max(sample.ice_ratio, 1.05) - 1.0) / 2 + 0.1  # per side, the ice shifted by <= 0.1
        pz = max(pz, int(math.ceil(beyond * nz + 140.0 / inst.voxel_size_nm)) + 2)
    th = math.radians(min(inst.tilt_max_deg, 80.0))
    half = (nx / 2) / math.cos(th) + (nz / 2 + pz) * math.tan(th)
    return pz, int(math.ceil(half - nx / 2)) + 2


def simulate_tomogram(
    shape: Sequence[int],
    instrument: str | Instrument = "bessy",
    seed: int | Sequence[int] = 0,
    cell: str | Sample | None = None,
    layout: PairedLayout | None = None,
) -> SimulatedTomogram:
    """Phantom -> tilt series (Beer-Lambert, PSF, Poisson) -> SIRT, with exact ground truth.

    instrument: a preset name, "random" (drawn from `seed`) or an Instrument; cell: see
    ``instruments.resolve`` (None: mammalian for presets, drawn under "random"). Everything drawn
    is in ``info["instrument"]`` and ``info["sample"]``. layout: set by ``cryosxt_sim.paired`` only.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (z, y, x) with every side >= 8, got {shape}")
    inst, sample = resolve(instrument, seed, cell)
    rng = np.random.default_rng(seed)
    v = inst.voxel_size_nm
    pz, px = layout.pad if layout else padding(shape, inst, sample)
    ph = build_phantom(shape, v, (pz, px), rng, inst.fiducials, sample, layout)
    angles = tilt_angles(inst.tilt_max_deg, inst.tilt_step_deg)
    sino = acquire(
        ph.mu,
        v,
        angles,
        shape[2],
        psf_fwhm_nm=inst.psf_fwhm_nm,
        dose=inst.dose,
        rng=rng,
        jitter_px=inst.jitter_px,
        flux_jitter=inst.flux_jitter,
    )
    del ph.mu
    rec = reconstruct(sino, shape[0], v, angles, inst.iterations)
    # The reconstruction grid is the FOV: centred in z on the padded phantom (same centre).
    rec *= np.float32(inst.polarity)  # float32 already: flip in place, no second volume
    info = {
        **ph.info,
        "instrument": dataclasses.asdict(inst),
        "sample": dataclasses.asdict(sample),
        "held_out": in_held_out(inst),
        "tilt_angles_deg": [float(a) for a in angles],
        "shape": list(shape),
        "voxel_size_nm": v,
        "padding_voxels_zx": [pz, px],
    }
    return SimulatedTomogram(rec, ph.membrane, ph.instances, ph.objects, v, inst.name, info)


def _shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, str):
        shape = [s for s in shape.replace("x", ",").split(",") if s.strip()]
    out = tuple(int(s) for s in shape)
    if len(out) != 3:
        raise ValueError(f"--shape needs Z,Y,X, got {shape!r}")
    return out


def _formats(formats) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    suffix = bundle_module("io.volume").FORMAT_SUFFIXES  # the names inference's `formats` takes
    try:
        return [suffix[f.strip().lower().lstrip(".")] for f in items if f.strip()]
    except KeyError as err:
        raise ValueError(f"unknown format {err}; use mrc, tif, nii.gz, ome.zarr") from None


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)) or not str(value).isdigit():
        raise ValueError(f"--{name} must be a whole number >= 0, got {value!r}")
    return int(value)


def _write(folder: Path, name: str, array: np.ndarray, voxel: float, suffixes: list[str]) -> None:
    write_volume = bundle_module("io.volume").write_volume
    folder.mkdir(parents=True, exist_ok=True)  # also with no formats: the .json goes here
    for suf in suffixes:
        write_volume(folder / f"{name}{suf}", array, voxel)


def main(
    out: str,
    count: int = 2,
    shape="32,192,192",
    seed: int = 0,
    instrument: str = "bessy",
    unlabeled: int = 0,
    unlabeled_instrument: str | None = None,
    formats="mrc",
    prefix: str = "sim",
    voxel_size_nm: float | None = None,
    tilt_max_deg: float | None = None,
    tilt_step_deg: float | None = None,
    dose: float | None = None,
    cell: str | None = None,
) -> list[str]:
    """Write `count` labeled and `unlabeled` unlabeled simulated tomograms in the training layout.

    Tomogram i of a run uses seed (seed, 0, i) (labeled) or (seed, 1, i) (unlabeled), so runs are
    reproducible and count/unlabeled do not change each other's volumes. `instrument` "random" and
    `cell` "random" draw per tomogram from that seed; overrides apply after the draw. Every tomogram's
    instrument and sample are in its NAME.json. Returns the written names.
    """
    from tqdm import tqdm

    # Every option is checked before the first (slow) simulation.
    zyx = _shape(shape)
    if min(zyx) < 8:
        raise ValueError(f"--shape needs every side >= 8, got {shape!r}")
    suffixes = _formats(formats)
    count, unlabeled, seed = _count(count, "count"), _count(unlabeled, "unlabeled"), _count(seed, "seed")
    over = {"voxel_size_nm": voxel_size_nm, "tilt_max_deg": tilt_max_deg, "tilt_step_deg": tilt_step_deg, "dose": dose}
    for name in (instrument, unlabeled_instrument or instrument):  # bad names fail before any file
        resolve(name, 0, cell, **over)
    root = bundle_module("io.atomic").output_folder(out, "--out")
    jobs = [(False, i) for i in range(count)] + [(True, i) for i in range(unlabeled)]
    names = []
    for is_unl, i in tqdm(jobs, desc="simulating", unit="tomogram"):
        key = (seed, int(is_unl), i)
        which = (unlabeled_instrument or instrument) if is_unl else instrument
        inst, sample = resolve(which, key, cell, **over)
        name = f"{prefix}_{inst.name}_s{seed}_{'u' if is_unl else ''}{i:03d}"
        tomo = simulate_tomogram(zyx, inst, key, sample)
        v = tomo.voxel_size_nm
        meta = {"name": name, "seed": list(key), "objects": tomo.objects, **tomo.info}
        if is_unl:
            _write(root / "unlabeled", name, tomo.image, v, suffixes)
            folder = root / "unlabeled"
        else:
            _write(root / "images", name, tomo.image, v, suffixes)
            _write(root / "labels", name, tomo.membrane, v, suffixes)
            _write(root / "instances", name, tomo.instances, v, suffixes)
            folder = root / "instances"
        with bundle_module("io.atomic").atomic_output(folder / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        names.append(name)
    return names
