"""Time and peak memory of simulate_tomogram for a few shapes (each in a fresh process).

    python bench/bench_simulate.py [--instrument bessy] [--shapes 32,128,128 64,256,256 128,256,256]
    python bench/bench_simulate.py --instrument random --shapes 64,256,256 --seeds 0 1 2 3 4 5

Prints one line per shape and seed: wall seconds (cold, including the projector build), CPU seconds
(all threads; on a busy machine wall time is not the cost), peak RSS in MiB, and for drawn settings
(`random`, `--cell random`) the cell kind, voxel size and projections x SIRT iterations drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(shape: str, instrument: str, cell: str | None, seed: int) -> dict:
    """Run in the child process: simulate once, report wall time and peak RSS."""
    import resource

    sys.path.insert(0, REPO)
    from cryosxt_sim.simulate import simulate_tomogram

    zyx = tuple(int(s) for s in shape.split(","))
    t0 = time.perf_counter()
    tomo = simulate_tomogram(zyx, instrument, seed=seed, cell=cell)
    sec = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_SELF)
    rss = use.ru_maxrss / 1024  # KiB on Linux
    inst = tomo.info["instrument"]
    return {
        "shape": shape,
        "instrument": instrument,
        "seed": seed,
        "cell": tomo.info["cell_kind"],
        "voxel_nm": inst["voxel_size_nm"],
        "work": len(tomo.info["tilt_angles_deg"]) * inst["iterations"],
        "seconds": round(sec, 2),
        "cpu_seconds": round(use.ru_utime + use.ru_stime, 1),
        "peak_rss_mib": round(rss),
        "objects": len(tomo.objects),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instrument", default="bessy")
    ap.add_argument("--cell", default=None, help="mammalian | yeast | crowded | random (default: preset's)")
    ap.add_argument("--shapes", nargs="+", default=["32,128,128", "64,256,256", "128,256,256"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(args.child, args.instrument, args.cell, args.seeds[0])))
        return
    cols = (
        "shape",
        "instrument",
        "seed",
        "cell",
        "voxel_nm",
        "work",
        "seconds",
        "cpu_seconds",
        "peak_rss_mib",
        "objects",
    )
    head = (
        "shape",
        "instrument",
        "seed",
        "cell",
        "voxel nm",
        "proj x it",
        "seconds",
        "CPU s",
        "peak RSS MiB",
        "objects",
    )
    row = "{:>12} {:>10} {:>5} {:>10} {:>9} {:>10} {:>8} {:>7} {:>13} {:>8}"
    print(row.format(*head))
    for shape in args.shapes:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--child", shape, "--instrument", args.instrument, "--seeds", str(seed)]
            if args.cell:
                cmd += ["--cell", args.cell]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(row.format(*(r[c] for c in cols)), flush=True)


if __name__ == "__main__":
    main()
