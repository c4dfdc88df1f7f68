"""Memory per slice against the memory budget, before and after, and the seams of planned tiles (not a test).

    python bench/bench_budget.py                          # width 64, one 1324 x 1284 slice
    python bench/bench_budget.py --before /path/to/old/bundle --budgets auto,8,16

Each configuration runs in a fresh process (peak resident memory is per process): build the
predictor, one warm-up slice, then the best of ``--repeats`` timed slices; the process's high-water
mark (VmHWM) is read at the end. ``--before`` points at another checkout's ``bundle/`` folder (e.g. a
``git worktree`` of an older commit) to measure its default path in the same run. The seam figure:
shipped width-8 weights on a simulated slice, tiles planned for a small budget against the whole slice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"

CHILD = r"""
import json, sys, time, numpy as np, torch
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.infer.predict import SlicePredictor
width, height, side, repeats = (int(v) for v in sys.argv[1:5])
budget = sys.argv[5]
torch.manual_seed(0)
net = DoubleDecoderNet(width=width, outputs="label").eval()
options = {} if budget == "default" else {"memory_budget_gb": None if budget == "auto" else float(budget)}
predictor = SlicePredictor(net, **options)
x = np.random.default_rng(0).normal(size=(1, height, side)).astype(np.float32)
predictor.predict(x)
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    predictor.predict(x)
    best = min(best, time.perf_counter() - start)
plan = predictor.memory_plan((height, side), 1).describe((height, side)) if budget != "default" else "-"
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
peak = int(status["VmHWM"].split()[0]) / 1024
print("RESULT " + json.dumps({"seconds": best, "peak_mib": peak, "plan": plan}))
"""


def run_child(bundle: Path, width: int, size: tuple[int, int], repeats: int, budget: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bundle), str(REPO)])}
    cmd = [sys.executable, "-c", CHILD, str(width), str(size[0]), str(size[1]), str(repeats), budget]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=bundle)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"}
    return json.loads(lines[0][len("RESULT ") :])


def seams(budget_gb: float) -> None:
    sys.path[:0] = [str(BUNDLE), str(REPO), str(REPO / "bench")]
    from bench_inference import realistic_slices
    from scripts.infer.predict import SlicePredictor
    from scripts.network.double_decoder import DoubleDecoderNet
    from scripts.network.weights import load_weights

    net = load_weights(DoubleDecoderNet(width=8, outputs="label"), BUNDLE / "models" / "model.pt").eval()
    slices = realistic_slices(1324, 1284, count=1)
    whole = SlicePredictor(net, memory_budget_gb=64).predict(slices).label
    small = SlicePredictor(net, memory_budget_gb=budget_gb)
    tiled = small.predict(slices).label
    differ = ((whole > 0) != (tiled > 0)).float().mean().item()
    print(f"\n== seams: shipped width-8 weights, simulated 1324 x 1284 slice, budget {budget_gb} GiB: "
          f"{small.memory_plan((1324, 1284), 1).describe((1324, 1284))}")  # fmt: skip
    fg_whole, fg_tiled = (whole > 0).float().mean().item(), (tiled > 0).float().mean().item()
    print(f"  mask differs from the whole slice on {100 * differ:.3f}% of pixels; foreground whole "
          f"{fg_whole:.4f}, tiled {fg_tiled:.4f}")  # fmt: skip


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", default="1324x1284")
    parser.add_argument("--budgets", default="auto,8,16", help="GiB, or auto (the default budget)")
    parser.add_argument("--before", type=Path, default=None, help="an older checkout's bundle/ folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seam-budget", type=float, default=1.5, help="GiB for the seam figure (0: skip)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    one, five, _ = os.getloadavg()
    print(f"width {args.width}, one {size[0]} x {size[1]} slice, best of {args.repeats} after a warm-up; "
          f"load {one:.2f} / {five:.2f} on {os.cpu_count()} CPUs")  # fmt: skip
    runs = [("before (" + str(args.before) + ")", args.before, "default")] if args.before else []
    runs += [(f"budget {b}", BUNDLE, b) for b in args.budgets.split(",")]
    print(f"  {'configuration':40s} {'s/slice':>8s} {'peak RSS MiB':>12s}  plan")
    for name, bundle, budget in runs:
        start = time.perf_counter()
        result = run_child(bundle, args.width, size, args.repeats, budget)
        if "error" in result:
            print(f"  {name:40s} FAILED: {result['error']}")
            continue
        print(f"  {name:40s} {result['seconds']:8.2f} {result['peak_mib']:12.0f}  {result['plan']} "
              f"({time.perf_counter() - start:.0f} s in all)", flush=True)  # fmt: skip
    if args.seam_budget:
        seams(args.seam_budget)


if __name__ == "__main__":
    main()
