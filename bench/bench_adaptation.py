"""Adaptation benchmark: does zero-label adaptation bring the weights to an instrument they never saw?
(prints a report; asserts nothing about accuracy).

    python bench/bench_adaptation.py --weights bundle/models/model.pt --seeds 2 --json adaptation.json

For each seed s, 4 unlabeled tomograms of the held-out instrument (``heldout`` preset: inverted
contrast, 32 nm voxels, 75 nm PSF, +/-56 degrees; a combination ``random`` never draws) are simulated
with seed 2000 + s (training data use seeds below 1000, the test tomograms 1000 and up), then the
real bundle command adapts the weights with the same schedule (adapt.json's CPU default unless
``--epochs``) in each arm of ``--arms``: ``adapt`` (adapt.json as users run it: labeled source
steps, the paper's unlabeled reconstruction steps and self-training on class-balanced pseudo labels
of those tomograms), ``control`` (``--semi_supervised false``: the same labeled steps, nothing from
the new tomograms) and, on request, ``recon`` (``--pseudo_labels false``: the paper's unlabeled
steps without pseudo labels) and ``pseudo`` (pseudo labels without the unlabeled steps). Every
``adapted.pt`` and the original weights are then scored by ``bench_generalisation.py`` on the
held-out instrument and on ``random`` (in-domain) test tomograms: Dice, F1 and the inference
summary's OOD score, before and after. Adapted weights are kept under ``--work``; a seed whose
``adapted.pt`` exists is not adapted again (delete the folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bundle"), str(REPO), str(REPO / "bench")]

import bench_generalisation as generalisation  # noqa: E402
from scripts.io.atomic import atomic_output  # noqa: E402
from scripts.train.adapt import source_dataset  # noqa: E402

from cryosxt_sim.simulate import main as simulate  # noqa: E402

UNLABELED_SEED_BASE = 2000
CONFIGS = f"['{REPO / 'bundle/configs/train.json'}','{REPO / 'bundle/configs/adapt.json'}']"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cryosxt-bench" / "adaptation"
DICE_FLOOR, CONTROL_GAP = 0.5, 0.05
ARMS = {
    "adapt": ["--semi_supervised", "true"],
    "control": ["--semi_supervised", "false"],
    "recon": ["--semi_supervised", "true", "--pseudo_labels", "false"],
    "pseudo": ["--semi_supervised", "true", "--unlabeled_steps_per_epoch", "0"],
}


def adapt(weights: Path, unlabeled: Path, out: Path, seed: int, extra: list[str]) -> float:
    """Run ``adapting`` with the ``extra`` options unless ``out/adapted.pt`` exists; seconds."""
    timing = out / "timing.json"
    if (out / "adapted.pt").is_file() and timing.is_file():
        return float(json.loads(timing.read_text())["seconds"])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "adapting", "--config_file", CONFIGS,
           "--init_weights", str(weights), "--unlabeled_dir", str(unlabeled), "--output_dir", str(out),
           "--seed", str(seed), "--progress_bar", "false", *extra]  # fmt: skip
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise generalisation.BenchError(f"adapting failed (exit {code}), see {out / 'log.txt'}: {shlex.join(cmd)}")
    seconds = time.perf_counter() - start
    with atomic_output(out / "timing.json") as tmp:
        tmp.write_text(json.dumps({"seconds": seconds, "command": shlex.join(cmd)}))
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights",
        type=Path,
        default=REPO / "bundle" / "models" / "model.pt",
        help="weights to adapt (default: the shipped ones)",
    )
    parser.add_argument("--seeds", type=int, default=2, help="adaptation seeds = test seeds (default 2)")
    parser.add_argument("--unlabeled", type=int, default=4, help="unlabeled tomograms per seed (default 4)")
    parser.add_argument("--unlabeled-shape", default="32,256,256", help="their Z,Y,X (default 32,256,256)")
    parser.add_argument("--shape", default=generalisation.DEFAULT_SHAPE, help="test tomograms' Z,Y,X")
    parser.add_argument(
        "--source", type=Path, default=None, help="labeled source folder (default: adapt.json's simulated one)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="adaptation epochs (default: adapt.json's)")
    parser.add_argument(
        "--arms", default="adapt,control", help=f"adaptation arms, of {','.join(ARMS)} (default adapt,control)"
    )
    parser.add_argument("--instrument", default="heldout", help="the new microscope (a preset; default heldout)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"runs and data (default {DEFAULT_WORK})")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra adapting override (--KEY VALUE), e.g. patch_size=64",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.weights.is_file():
        raise generalisation.BenchError(f"--weights {args.weights}: weights file not found")
    work = args.work.expanduser()
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise generalisation.BenchError(f"--arms {args.arms!r}: expected some of {', '.join(ARMS)}")
    # adapt.json's default source data, simulated once for every run (each run would make its own)
    source = args.source or Path(source_dataset(work))
    extra = ["--dataset_dir", str(source), *(["--adapt_epochs", str(args.epochs)] if args.epochs else [])]
    arms = {"before": args.weights.resolve()}
    seconds: dict[str, float] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise generalisation.BenchError(f"--option {item!r}: expected KEY=VALUE")
        extra += [f"--{key}", value]
    for k in range(args.seeds):
        seed = UNLABELED_SEED_BASE + k
        data = work / f"{args.instrument}_s{seed}_{args.unlabeled}x{args.unlabeled_shape.replace(',', 'x')}"
        if not (data / "unlabeled").is_dir() or len(list((data / "unlabeled").glob("*.mrc"))) < args.unlabeled:
            simulate(
                out=str(data),
                count=0,
                unlabeled=args.unlabeled,
                shape=args.unlabeled_shape,
                seed=seed,
                instrument=args.instrument,
            )
        for name in names:
            out = work / "runs" / f"{name}_s{k}" / (f"e{args.epochs}" if args.epochs else "default")
            seconds[f"{name}_s{k}"] = adapt(args.weights, data / "unlabeled", out, k, [*extra, *ARMS[name]])
            arms[f"{name}_s{k}"] = out / "adapted.pt"
            print(f"{name} seed {k}: {out / 'adapted.pt'} ({seconds[f'{name}_s{k}']:.0f} s)", flush=True)

    report = generalisation.main([
        *[a for name, path in arms.items() for a in ("--weights", f"{name}={path}")],
        "--conditions", f"{args.instrument},random", "--seeds", str(args.seeds), "--shape", args.shape,
    ])  # fmt: skip
    # (the preset also brings its -flip twin; only the preset's own polarity is counted below)
    held = [c for c in report["conditions"] if c == args.instrument] or report["conditions"][:1]
    summary = {"arms": {}, "seconds": seconds}
    count = f"{args.seeds} seeds, {args.unlabeled} unlabeled tomograms each"
    print(f"\nAdaptation to '{args.instrument}' ({count})\n")
    print("| arm | Dice held-out (mean, spread) | OOD score held-out | OOD score in-domain (random) |")
    print("|---|---|---|---|")
    for group in ("before", *names):
        names = [n for n in arms if n == group or n.startswith(group + "_")]
        dice, ood_held, ood_in = [], [], []
        for n in names:
            for tomo, result in report["results"][n].items():
                ood = (result["summary"].get("ood") or {}).get("score")
                if tomo.startswith(held[0] + "_s"):  # every arm on every held-out test tomogram
                    dice.append(result["dice"])
                    ood_held.append(ood)
                elif tomo.startswith("random_s"):
                    ood_in.append(ood)
        row = {"dice": dice, "ood_held_out": ood_held, "ood_in_domain": ood_in}
        summary["arms"][group] = row

        def stat(v: list) -> str:
            v = [x for x in v if x is not None]
            return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-"

        print(f"| {group} | {stat(dice)} | {stat(ood_held)} | {stat(ood_in)} |")
    mean = {g: float(np.mean(summary["arms"][g]["dice"])) for g in summary["arms"] if summary["arms"][g]["dice"]}
    if "adapt" in mean and "control" in mean:
        gap = mean["adapt"] - mean["control"]
        print(
            f"\n- Dice after adaptation {mean['adapt']:.3f} vs >= {DICE_FLOOR}: "
            f"{generalisation.verdict(mean['adapt'], DICE_FLOOR)}; above the control by {gap:.3f} vs >= "
            f"{CONTROL_GAP}: {generalisation.verdict(gap, CONTROL_GAP)}"
        )
    before = summary["arms"]["before"]
    held_ood = [x for x in before["ood_held_out"] if x is not None]
    in_ood = [x for x in before["ood_in_domain"] if x is not None]
    if held_ood and in_ood:
        sep = min(held_ood) > max(in_ood)
        print(
            f"- OOD score before adaptation: held-out {min(held_ood):.3f}-{max(held_ood):.3f}, in-domain "
            f"{min(in_ood):.3f}-{max(in_ood):.3f}: {'separates' if sep else 'does NOT separate'}"
        )
    times = [v for k, v in seconds.items() if k.startswith("adapt_") and v == v]
    if times:
        print(f"- adaptation run time {np.mean(times):.0f} s on average ({os.cpu_count()} CPUs)")
    if args.json:
        with atomic_output(args.json.expanduser()) as tmp:
            tmp.write_text(json.dumps({"summary": summary, "generalisation": report}, indent=1, default=float))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (generalisation.BenchError, OSError, ValueError) as err:
        sys.stdout.flush()
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
