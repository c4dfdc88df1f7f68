"""Time and peak memory of simulate_tomogram for a few shapes (each in a fresh process).

    python bench/bench_simulate.py [--instrument bessy] [--shapes 32,128,128 64,256,256 128,256,256]

Prints one line per shape: wall seconds (cold, including the projector build), CPU seconds (all
threads; on a busy machine wall time is not the cost) and peak RSS in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(shape: str, instrument: str) -> dict:
    """Run in the child process: simulate once, report wall time and peak RSS."""
    import resource

    sys.path.insert(0, REPO)
    from cryosxt_sim.simulate import simulate_tomogram

    zyx = tuple(int(s) for s in shape.split(","))
    t0 = time.perf_counter()
    tomo = simulate_tomogram(zyx, instrument, seed=0)
    sec = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_SELF)
    rss = use.ru_maxrss / 1024  # KiB on Linux
    vol_mib = tomo.image.nbytes / 2**20
    return {"shape": shape, "instrument": instrument, "seconds": round(sec, 2),
            "cpu_seconds": round(use.ru_utime + use.ru_stime, 1), "peak_rss_mib": round(rss),
            "volume_mib": round(vol_mib, 1), "objects": len(tomo.objects)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instrument", default="bessy")
    ap.add_argument("--shapes", nargs="+", default=["32,128,128", "64,256,256", "128,256,256"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(args.child, args.instrument)))
        return
    head = ("shape", "instrument", "seconds", "CPU s", "peak RSS MiB", "volume MiB", "objects")
    print("{:>14} {:>10} {:>8} {:>7} {:>13} {:>11} {:>8}".format(*head))
    for shape in args.shapes:
        out = subprocess.run([sys.executable, __file__, "--child", shape, "--instrument", args.instrument],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cols = ("shape", "instrument", "seconds", "cpu_seconds", "peak_rss_mib", "volume_mib", "objects")
        print("{:>14} {:>10} {:>8} {:>7} {:>13} {:>11} {:>8}".format(*(r[c] for c in cols)))


if __name__ == "__main__":
    main()
