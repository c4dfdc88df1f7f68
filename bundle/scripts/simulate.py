"""Simulated cryo-SXT tomograms with exact membrane ground truth, for demos, tests and benchmarks.

    python -m scripts.simulate --out D --count 2 --shape 32,128,128 --seed 0 --instrument bessy

writes D/images/NAME.mrc, D/labels/NAME.mrc (uint8 0/1), D/instances/NAME.mrc + NAME.json and,
with --unlabeled K, K more tomograms in D/unlabeled/. Physics and presets: docs/simulator.md.
``--out`` is required (no default folder, so nothing lands beside the code by accident), and the
options are checked before any simulation starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_output, output_folder
from .phantom import build_phantom
from .tomography import acquire, reconstruct, tilt_angles


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
    "labsource": Instrument("labsource", 35.0, 60.0, 2.0, 80.0, 300.0, -1, 15, jitter_px=0.5,
                            flux_jitter=0.03),
}


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


def get_instrument(instrument: str | Instrument, **overrides) -> Instrument:
    """A preset by name (or an Instrument), with non-None overrides applied."""
    if isinstance(instrument, str):
        if instrument not in INSTRUMENTS:
            raise ValueError(f"unknown instrument {instrument!r}; choose from {sorted(INSTRUMENTS)}")
        instrument = INSTRUMENTS[instrument]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(instrument, **changes) if changes else instrument


def padding(shape: tuple[int, int, int], inst: Instrument) -> tuple[int, int]:
    """(z, x) padding in voxels so every ray reaching the detector crosses the whole slab."""
    nz, _, nx = shape
    pz = int(math.ceil(0.25 * nz)) + 2
    th = math.radians(min(inst.tilt_max_deg, 80.0))
    half = (nx / 2) / math.cos(th) + (nz / 2 + pz) * math.tan(th)
    return pz, int(math.ceil(half - nx / 2)) + 2


def simulate_tomogram(shape: Sequence[int], instrument: str | Instrument = "bessy",
                      seed: int | Sequence[int] = 0) -> SimulatedTomogram:
    """Phantom -> tilt series (Beer-Lambert, PSF, Poisson) -> SIRT, with exact ground truth."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (z, y, x) with every side >= 8, got {shape}")
    inst = get_instrument(instrument)
    rng = np.random.default_rng(seed)
    v = inst.voxel_size_nm
    pz, px = padding(shape, inst)
    ph = build_phantom(shape, v, (pz, px), rng, inst.fiducials)
    angles = tilt_angles(inst.tilt_max_deg, inst.tilt_step_deg)
    sino = acquire(ph.mu, v, angles, shape[2], psf_fwhm_nm=inst.psf_fwhm_nm, dose=inst.dose, rng=rng,
                   jitter_px=inst.jitter_px, flux_jitter=inst.flux_jitter)
    del ph.mu
    rec = reconstruct(sino, shape[0], v, angles, inst.iterations)
    # The reconstruction grid is the FOV: centred in z on the padded phantom (same centre).
    rec *= np.float32(inst.polarity)  # float32 already: flip in place, no second volume
    info = {**ph.info, "instrument": dataclasses.asdict(inst), "tilt_angles_deg": [float(a) for a in angles],
            "shape": list(shape), "voxel_size_nm": v, "padding_voxels_zx": [pz, px]}
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
    suffix = {"mrc": ".mrc", "tif": ".tif", "tiff": ".tif", "nii": ".nii.gz", "nii.gz": ".nii.gz"}
    try:
        return [suffix[f.strip().lower().lstrip(".")] for f in items if f.strip()]
    except KeyError as err:
        raise ValueError(f"unknown format {err}; use mrc, tif, nii.gz") from None


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)) or not str(value).isdigit():
        raise ValueError(f"--{name} must be a whole number >= 0, got {value!r}")
    return int(value)


def _write(folder: Path, name: str, array: np.ndarray, voxel: float, suffixes: list[str]) -> None:
    from .volume_io import write_volume

    folder.mkdir(parents=True, exist_ok=True)  # also with no formats: the .json goes here
    for suf in suffixes:
        write_volume(folder / f"{name}{suf}", array, voxel)


def main(out: str, count: int = 2, shape="32,192,192", seed: int = 0, instrument: str = "bessy",
         unlabeled: int = 0, unlabeled_instrument: str | None = None, formats="mrc", prefix: str = "sim",
         voxel_size_nm: float | None = None, tilt_max_deg: float | None = None,
         tilt_step_deg: float | None = None, dose: float | None = None) -> list[str]:
    """Write `count` labeled and `unlabeled` unlabeled simulated tomograms in the training layout.

    Tomogram i of a run uses seed (seed, 0, i) (labeled) or (seed, 1, i) (unlabeled), so runs are
    reproducible and count/unlabeled do not change each other's volumes. Returns the written names.
    """
    from tqdm import tqdm

    # Every option is checked before the first (slow) simulation.
    zyx = _shape(shape)
    if min(zyx) < 8:
        raise ValueError(f"--shape needs every side >= 8, got {shape!r}")
    suffixes = _formats(formats)
    count, unlabeled = _count(count, "count"), _count(unlabeled, "unlabeled")
    over = {"voxel_size_nm": voxel_size_nm, "tilt_max_deg": tilt_max_deg, "tilt_step_deg": tilt_step_deg,
            "dose": dose}
    inst = get_instrument(instrument, **over)
    inst_u = get_instrument(unlabeled_instrument or instrument, **over)
    root = output_folder(out, "--out")
    jobs = [(False, i) for i in range(count)] + [(True, i) for i in range(unlabeled)]
    names = []
    for is_unl, i in tqdm(jobs, desc="simulating", unit="tomogram"):
        ins = inst_u if is_unl else inst
        name = f"{prefix}_{ins.name}_s{seed}_{'u' if is_unl else ''}{i:03d}"
        tomo = simulate_tomogram(zyx, ins, (int(seed), int(is_unl), i))
        v = tomo.voxel_size_nm
        if is_unl:
            _write(root / "unlabeled", name, tomo.image, v, suffixes)
        else:
            _write(root / "images", name, tomo.image, v, suffixes)
            _write(root / "labels", name, tomo.membrane, v, suffixes)
            _write(root / "instances", name, tomo.instances, v, suffixes)
            meta = {"name": name, "seed": [int(seed), 0, i], "objects": tomo.objects, **tomo.info}
            with atomic_output(root / "instances" / f"{name}.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=1))
        names.append(name)
    return names


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)
