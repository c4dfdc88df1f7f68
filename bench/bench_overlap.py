"""End-to-end seconds per slice, with reading and writing beside the network or not, against the
network alone (prints a table; not a test).

    python bench/bench_overlap.py               # 64 x 1324 x 1284 float32 MRC at width 16: several minutes
    python bench/bench_overlap.py --slices 8    # a quick run

- network only: ``SlicePredictor.predict`` on slices already in memory, in batches of ``--batch-size``,
  built as ``configs/inference.json`` builds it (fused, kept tensors, one window per slice). Its time
  includes the first batch, which builds the fused network and its kept tensors, as a run's does.
- reading and writing alone: ``segment_volume`` with the network replaced by a tanh of the raw slice,
  one step after the other, into the same output files: the most that overlapping can hide.
- end to end: the real ``python -m monai.bundle run inference`` command on the MRC, writing the mask
  as MRC and TIFF, with ``--overlap_io true`` and ``false``. "segment" is the tomogram's own time from
  its summary (opening, network, post-processing, writing); "wall" adds the process's start-up (imports,
  loading the weights). The out-of-distribution score is off (``--ood_slices 0``): it runs the network
  on extra slices, a cost of its own that is not reading or writing.

Weights are random (width ``--net-width``): the time does not depend on their values. The tomogram is a
smooth random texture with fine noise, a different one per slice. On a shared machine figures vary
from run to run; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import mrcfile
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE)]

from scripts.infer.postprocess import PostProcessing  # noqa: E402
from scripts.infer.predict import SlicePrediction, SlicePredictor  # noqa: E402
from scripts.infer.segment import segment_volume  # noqa: E402
from scripts.infer.workflow import SUFFIXES  # noqa: E402
from scripts.io.pages import trim_heap  # noqa: E402
from scripts.io.volume import SliceWriter, open_volume  # noqa: E402
from scripts.network.double_decoder import DoubleDecoderNet  # noqa: E402
from scripts.network.weights import load_weights  # noqa: E402
from scripts.options import as_names  # noqa: E402

CONFIG = BUNDLE / "configs" / "inference.json"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random slice (blobs of about 8 pixels) with fine noise, float32."""
    coarse = rng.normal(size=(height // 8 + 2, width // 8 + 2)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width]
    return smooth + 0.3 * rng.normal(size=(height, width)).astype(np.float32)


def write_tomogram(path: Path, slices: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=(slices, height, width), mrc_mode=2) as mrc:
        for z in range(slices):
            mrc.data[z] = texture(rng, height, width)
        mrc.voxel_size = 98.0


def network_only(tomogram: Path, weights: Path, net_width: int, batch_size: int) -> float:
    """Seconds per slice of ``SlicePredictor.predict`` on the tomogram's slices, read beforehand."""
    with mrcfile.open(tomogram) as mrc:
        slices = np.array(mrc.data)
    network = load_weights(DoubleDecoderNet(width=net_width, outputs="label"), weights)
    predictor = SlicePredictor(network, max_window=2048)
    count = len(slices)
    start = time.perf_counter()
    for z in range(0, count, batch_size):
        predictor.predict(slices[z : z + batch_size])
    seconds = time.perf_counter() - start
    del predictor, network, slices  # the kept tensors go before the bundle runs start
    gc.collect()
    trim_heap()
    return seconds / count


class _NoNetwork:
    """Stands in for the network so that only reading, post-processing and writing are timed."""

    tta = False

    def predict(self, slices: np.ndarray, scale: object = None) -> SlicePrediction:
        return SlicePrediction(label=torch.from_numpy(np.tanh(slices.astype(np.float32))))


def io_only(tomogram: Path, out: Path, batch_size: int, formats: str) -> float:
    """Seconds per slice of reading, thresholding and writing the mask, one step after the other."""
    volume = open_volume(tomogram)
    out.mkdir()
    start = time.perf_counter()
    with ExitStack() as stack:  # the files are finished (renamed into place) inside the timing
        writers = [stack.enter_context(SliceWriter(out / f"cell_mask{SUFFIXES[f]}", volume.data.shape,
                                                   np.uint8, like=volume))
                   for f in as_names(formats, "formats")]  # fmt: skip
        segment_volume(volume.data, _NoNetwork(), PostProcessing(), {"mask": writers},
                       batch_size=batch_size, overlap_io=False)  # fmt: skip
    return (time.perf_counter() - start) / volume.data.shape[0]


def end_to_end(
    folder: Path, out: Path, weights: Path, net_width: int, batch_size: int, overlap: bool, formats: str
) -> tuple[float, float]:
    """(segment, wall) seconds per slice of the bundle's inference command."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIG),
           "--dataset_dir", str(folder), "--output_dir", str(out), "--weights", str(weights),
           "--width", str(net_width), "--batch_size", str(batch_size), "--formats", formats,
           "--overlap_io", str(overlap).lower(), "--ood_slices", "0"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the bundle run failed:\n{result.stderr[-3000:]}")
    (summary,) = out.glob("*_summary.json")
    info = json.loads(summary.read_text())
    depth = info["shape"][0]
    return info["seconds"] / depth, wall / depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", default="1324x1284", help="slice height x width")
    parser.add_argument("--net-width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--formats", default="[mrc, tif]")
    args = parser.parse_args()
    height, width = (int(n) for n in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "tomograms"
        folder.mkdir()
        tomogram = folder / "cell.mrc"
        write_tomogram(tomogram, args.slices, height, width)
        weights = tmp_path / f"w{args.net_width}.pt"
        torch.manual_seed(0)
        torch.save(DoubleDecoderNet(width=args.net_width).state_dict(), weights)
        print(
            f"{args.slices} x {height} x {width} float32 MRC, width {args.net_width} random weights, "
            f"batch {args.batch_size}, formats {args.formats}, {torch.get_num_threads()} torch threads"
        )

        rows = []
        print(f"network only ... [{load()}]", flush=True)
        net = network_only(tomogram, weights, args.net_width, args.batch_size)
        rows.append(("network only (predict on slices in memory)", net, None))
        print(f"reading and writing alone ... [{load()}]", flush=True)
        io = io_only(tomogram, tmp_path / "out_io", args.batch_size, args.formats)
        rows.append(("reading, post-processing, writing alone (no network)", io, None))
        for overlap in (False, True):
            print(f"end to end, overlap_io {str(overlap).lower()} ... [{load()}]", flush=True)
            out = tmp_path / f"out_{overlap}"
            segment, wall = end_to_end(folder, out, weights, args.net_width, args.batch_size, overlap,
                                       args.formats)  # fmt: skip
            rows.append((f"end to end, overlap_io {str(overlap).lower()}", segment, wall))
        print(f"done [{load()}]\n")

    print("| path | s/slice (segment) | vs network | s/slice (wall, with start-up) |")
    print("|---|---|---|---|")
    for name, seconds, wall in rows:
        ratio = f"{seconds / net:.2f}x" if net else "-"
        print(f"| {name} | {seconds:.3f} | {ratio} | {'-' if wall is None else f'{wall:.3f}'} |")


if __name__ == "__main__":
    main()
