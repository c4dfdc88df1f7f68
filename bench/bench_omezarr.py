"""Peak memory of segmenting OME-Zarr stores of growing depth (prints a report; not a test).

    OMP_NUM_THREADS=1 python bench/bench_omezarr.py                 # 50 and 200 x 1024 x 1024 uint8
    OMP_NUM_THREADS=1 python bench/bench_omezarr.py --depths 10,40 --side 512

Each store is written slice by slice (chunks of one slice) and segmented by the real
``monai.bundle run inference`` command with random width-4 weights, reading and writing OME-Zarr
(``--formats [ome.zarr]``). The peak resident memory of that command (the kernel's high-water mark,
sampled from /proc) must not grow with the depth: slices are read chunk by chunk and the mask is
written block by block.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_inference, beside this file

from bench_inference import header, load, run_inference, weights_file  # noqa: E402
from scripts.io.volume import SliceWriter, open_volume  # noqa: E402  (bench_inference adds bundle/)


def write_store(path: Path, depth: int, side: int) -> None:
    """A uint8 OME-Zarr of ``depth`` slices of smooth noise, written one slice at a time."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    with SliceWriter(path, (depth, side, side), np.uint8, voxel_size_nm=10.0) as writer:
        for z in range(depth):
            rings = np.sin((yy - side / 2) ** 2 / (2000.0 + 50 * z) + xx / 40.0)
            noise = rng.normal(0.0, 0.3, size=(side, side))
            writer.write(z, np.clip(127.5 * (rings + noise + 1.0), 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="50,200", help="slices of each store, comma separated")
    parser.add_argument("--side", type=int, default=1024, help="slice height and width")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    header(
        f"peak RSS of `monai.bundle run inference` on OME-Zarr vs depth ({args.side} x {args.side} uint8, "
        "width 4, OME-Zarr out)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_zarr_") as tmp:
        tmp = Path(tmp)
        weights = weights_file(tmp, 4)
        print(f"  {'slices':>6s} {'input MiB':>9s} {'seconds':>8s} {'slices/s':>8s} {'peak RSS':>8s} "
              f"{'anon':>6s} {'file':>6s}  (MiB)")  # fmt: skip
        peaks = []
        for depth in depths:
            data, out = tmp / f"in_{depth}", tmp / f"out_{depth}"
            write_store(data / "tomo.ome.zarr", depth, args.side)
            seconds, peak, code = run_inference(data, out, weights, 4, "--formats", "[ome.zarr]")
            if code == 0:
                mask = open_volume(out / "tomo_mask.ome.zarr")
                assert mask.shape == (depth, args.side, args.side), mask.shape
            peaks.append(peak["rss"])
            size = depth * args.side * args.side / 2**20
            status = "" if code == 0 else f"  FAILED (exit {code})"
            print(f"  {depth:6d} {size:9.1f} {seconds:8.1f} {depth / seconds:8.2f} {peak['rss']:8.0f} "
                  f"{peak['anon']:6.0f} {peak['file']:6.0f}{status}", flush=True)  # fmt: skip
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ratio = depths[-1] / depths[0]
        print(f"  peak RSS spread: {max(peaks) - min(peaks):.0f} MiB over a {ratio:.0f}x deeper store; this "
              f"script (writing the stores) peaked at {own:.0f} MiB ({load()})")  # fmt: skip


if __name__ == "__main__":
    main()
