"""GPU inference figures: precision modes against float32, and a whole tomogram end to end (not a test).

    python bench/bench_inference.py --device cuda            # the same as:
    python bench/bench_gpu.py --width 64 --depth 350 --size 1324x1284

Sections: (a) the predictor (standardisation on the device, fused network, batched slices) per precision,
seconds per slice and mask agreement with float32; (b) the real ``monai.bundle run inference`` command
on a ``depth`` x H x W float32 MRC (reading, network, writing the masks), wall seconds and the
in-process seconds of its summary, with the network-alone figure beside it; (c) peak device memory
against the memory plan's estimate. Random-init weights at widths other than the shipped 8 (the
published width-64 weights cannot be downloaded here): speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bundle"), str(REPO), str(REPO / "bench")]

from bench_inference import network, realistic_slices, write_mrc  # noqa: E402
from scripts.infer.predict import SlicePredictor  # noqa: E402

GIB = 2**30


def synced(step) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


MODES = {
    "float32": ("float32 (TF32 convs)", {}),
    "float16": ("float16 AMP", {"amp": "float16"}),
    "bfloat16": ("bfloat16 AMP", {"amp": "bfloat16"}),
    "compile": ("float16 AMP + torch.compile", {"amp": "float16", "compile": True}),
}


def bench_precisions(width: int, size: tuple[int, int], batch: int, repeats: int, names: list[str]) -> float:
    """(a) + (c): seconds per slice of the predictor per mode; returns the first mode's figure."""
    net = network(width)
    slices = realistic_slices(*size, count=batch)
    modes = dict(MODES[name] for name in names)
    weights = "shipped weights" if width == 8 else "random init"
    print(f"\n== (a) SlicePredictor on cuda, width {width} ({weights}), "
          f"{batch} slices of {size[0]} x {size[1]} per call")  # fmt: skip
    labels, per_slice = {}, {}
    for name, options in modes.items():
        predictor = SlicePredictor(net, device="cuda", **options)
        torch.cuda.reset_peak_memory_stats()
        first = synced(lambda p=predictor, key=name: labels.__setitem__(key, p.predict(slices).label))
        times = [synced(lambda p=predictor: p.predict(slices)) for _ in range(repeats)]
        per_slice[name] = min(times) / batch
        plan = predictor.memory_plan(size, batch)
        peak = torch.cuda.max_memory_allocated() / GIB
        print(f"  {name:28s} {per_slice[name] * 1000:7.1f} ms/slice (first call {first:.1f} s); "
              f"{plan.slices_per_pass} slices per pass; peak {peak:.1f} GiB allocated, "
              f"plan estimate {plan.estimate_bytes / GIB:.1f} GiB")  # fmt: skip
        del predictor
        torch.cuda.empty_cache()
    first, reference = next(iter(labels.items()))
    for name, label in labels.items():
        agree = ((label > 0) == (reference > 0)).double().mean().item()
        print(f"  {name:28s} masks agree with {first} on {100 * agree:.3f}% of pixels")
    return next(iter(per_slice.values()))


RUNS = {
    "I/O beside the network": [],
    "I/O one step after the other": ["--overlap_io", "false"],
    "no OOD score": ["--ood_slices", "0"],
}


def bench_end_to_end(
    width: int, depth: int, size: tuple[int, int], batch: int, formats: str, amp: str, runs: list[str]
) -> None:
    """(b): the real bundle command on a whole tomogram."""
    print(f"\n== (b) `monai.bundle run inference` on cuda: {depth} x {size[0]} x {size[1]} float32 MRC, "
          f"width {width}, amp {amp}, batch {batch}, formats {formats}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        tmp = Path(tmp)
        weights = tmp / f"random_w{width}.pt"
        torch.save(network(width).state_dict(), weights)
        data = tmp / "in"
        data.mkdir()
        start = time.perf_counter()
        write_mrc(data / "tomo.mrc", (depth, *size), realistic_slices(*size, count=4))
        gib = depth * size[0] * size[1] * 4 / GIB
        print(f"  input written in {time.perf_counter() - start:.1f} s ({gib:.2f} GiB)")
        for run, name in enumerate(runs):  # the input is in the page cache for all
            extra = RUNS[name]
            out = tmp / f"out{run}"
            cmd = [
                sys.executable, "-m", "monai.bundle", "run", "inference",
                "--config_file", str(REPO / "bundle" / "configs" / "inference.json"),
                "--dataset_dir", str(data), "--output_dir", str(out), "--weights", str(weights),
                "--width", str(width), "--amp", amp, "--batch_size", str(batch), "--formats", formats, *extra,
            ]  # fmt: skip
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode != 0:
                print(result.stderr[-3000:])
                print(f"  {name}: FAILED (exit {result.returncode})")
                continue
            summary = json.loads((out / "tomo_summary.json").read_text())
            log = (result.stdout + result.stderr).splitlines()  # the bundle logs to stdout
            plans = [line.split("memory plan for ", 1)[1] for line in log
                     if "memory plan for" in line]  # fmt: skip
            seconds = summary["seconds"]
            print(f"  {name}: {wall:.1f} s wall (process start, imports, CUDA init included); "
                  f"{seconds:.1f} s segmenting ({seconds / depth * 1000:.1f} ms/slice), "
                  f"device {summary['device']}; plan: {plans[0] if plans else '?'}")  # fmt: skip


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--agreement-width", type=int, default=8, help="also (a) at this width (0: skip)")
    parser.add_argument("--size", default="1324x1284")
    parser.add_argument("--depth", type=int, default=350)
    parser.add_argument("--batch", type=int, default=8, help="slices per predictor call / bundle batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="float32,float16,bfloat16",
                        help=f"(a)'s modes among {list(MODES)}; the first is the reference")  # fmt: skip
    parser.add_argument("--formats", default="[mrc,tif]")
    parser.add_argument("--amp", default="float16")
    parser.add_argument("--runs", default="0,1", help=f"(b)'s runs by number in {list(RUNS)}")
    parser.add_argument("--only", choices=["precision", "end-to-end"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False)")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"torch {torch.__version__}, {props.name}, {props.multi_processor_count} SMs, "
          f"{free / GIB:.0f} of {total / GIB:.0f} GiB free; cudnn {torch.backends.cudnn.version()}, "
          f"TF32 convs {torch.backends.cudnn.allow_tf32}")  # fmt: skip
    if args.only in (None, "precision"):
        modes = args.modes.split(",")
        if args.agreement_width:
            bench_precisions(args.agreement_width, size, args.batch, args.repeats, modes)
        network_s = bench_precisions(args.width, size, args.batch, args.repeats, modes)
        label = MODES[modes[0]][0]
        print(f"  network alone, {label}: {network_s * args.depth:.1f} s for {args.depth} slices")
    if args.only in (None, "end-to-end"):
        runs = [list(RUNS)[int(i)] for i in args.runs.split(",")]
        bench_end_to_end(args.width, args.depth, size, args.batch, args.formats, args.amp, runs)


if __name__ == "__main__":
    main()
