"""Benchmark: semi-supervised vs supervised-only training, and training throughput. Prints figures.

On simulated tomograms: a few annotated slices from one instrument ("bessy"), unlabeled tomograms
from the same and from another instrument ("mistral"), and held-out fully labeled tomograms of both.
Both arms run the real bundle config (``bundle/configs/train.json``) with the same seed, network,
labeled data and number of epochs; the semi-supervised arm adds the unlabeled iterations. The final
weights (``last.pt``, no validation-based selection) are scored with ``evaluate.json``.

    python bench/bench_training.py --workdir /tmp/bench_training            # defaults below
    python bench/bench_training.py --epochs 30 --shape 64,256,256 --patch_size 256 --batch_size 1

Throughput: crops per second of labeled and unlabeled steps of ``SemiSupervisedTrainer`` on random
(batch, 1, patch, patch) tensors (data loading excluded) at each width in ``--widths``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bundle"), str(REPO)]  # the bundle's scripts, the simulator

from scripts.io.labels import IGNORE_VALUE  # noqa: E402
from scripts.io.volume import open_volume, write_volume  # noqa: E402
from scripts.network.double_decoder import DoubleDecoderNet  # noqa: E402
from scripts.train.engine import LABELED, UNLABELED, SemiSupervisedTrainer, unlabeled_parameters  # noqa: E402
from scripts.train.losses import LabeledLoss, UnlabeledLoss  # noqa: E402

from cryosxt_sim.simulate import main as simulate  # noqa: E402

CONFIGS = REPO / "bundle" / "configs"


def keep_annotated(label_dir: Path, per_volume: int) -> int:
    """Mark all but ``per_volume`` evenly spaced interior slices of each label volume as 255."""
    kept = 0
    for path in sorted(label_dir.glob("*.mrc")):
        label = np.array(open_volume(path).data)
        nz = label.shape[0]
        keep = np.unique(np.linspace(0.2 * nz, 0.8 * nz, per_volume).round().astype(int))
        drop = np.setdiff1d(np.arange(nz), keep)
        label[drop] = IGNORE_VALUE
        write_volume(path, label, open_volume(path).voxel_size_nm)
        kept += len(keep)
    return kept


def make_data(
    workdir: Path, shape: str, labeled_volumes: int, labeled_slices: int, unlabeled: int, test_volumes: int, seed: int
) -> dict[str, Path]:
    """Simulate the folders once (reused when they exist)."""
    dirs = {name: workdir / name for name in ("train", "test_bessy", "test_mistral")}
    if not (workdir / "data.done").exists():
        simulate(
            out=str(dirs["train"]),
            count=labeled_volumes,
            shape=shape,
            seed=seed,
            instrument="bessy",
            unlabeled=unlabeled,
        )
        simulate(out=str(dirs["train"]), count=0, shape=shape, seed=seed + 1, instrument="mistral", unlabeled=unlabeled)
        kept = keep_annotated(dirs["train"] / "labels", max(1, labeled_slices // labeled_volumes))
        simulate(out=str(dirs["test_bessy"]), count=test_volumes, shape=shape, seed=seed + 2, instrument="bessy")
        simulate(out=str(dirs["test_mistral"]), count=test_volumes, shape=shape, seed=seed + 3, instrument="mistral")
        (workdir / "data.done").write_text(json.dumps({"annotated_slices": kept}))
    return dirs


def run_bundle(config_files: list[Path], run_id: str, **overrides) -> None:
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(
            config_file=[str(c) for c in config_files],
            workflow_type=None,
            run_id=run_id,
            logging_file=False,
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()


def train_and_score(args: argparse.Namespace, dirs: dict[str, Path], semi: bool) -> dict:
    out = args.workdir / ("semi" if semi else "supervised")
    start = time.monotonic()
    if not (out / "last.pt").exists():
        run_bundle(
            [CONFIGS / "train.json"],
            "training",
            dataset_dir=str(dirs["train"]),
            output_dir=str(out),
            semi_supervised=semi,
            width=args.width,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            labeled_repeats=args.labeled_repeats,
            unlabeled_steps_per_epoch=args.unlabeled_steps_per_epoch or None,
            learning_rate=args.learning_rate,
            val_fraction=0.0,
            num_workers=0,
            progress_bar=False,
            seed=args.seed,
            **{"train#trainer#max_epochs": args.epochs},
        )
    train_s = time.monotonic() - start
    scores = {"train_s": train_s}
    for name in ("test_bessy", "test_mistral"):
        ev = out / f"eval_{name}"
        run_bundle(
            [CONFIGS / "train.json", CONFIGS / "evaluate.json"],
            "evaluating",
            dataset_dir=str(dirs[name]),
            output_dir=str(ev),
            ckpt_path=str(out / "last.pt"),
            num_workers=0,
        )
        scores[name] = json.loads((ev / "metrics.json").read_text())["overall"]
    return scores


def throughput(width: int, patch: int, batch: int, steps: int) -> dict[str, float]:
    """Crops per second of labeled and unlabeled steps (one warm-up step each, not timed)."""
    torch.manual_seed(0)
    net = DoubleDecoderNet(width)
    image = torch.randn(batch, 1, patch, patch)
    labeled = {"image": image, "label": torch.where(image > 0.5, 1.0, -1.0), "mask": torch.ones_like(image)}
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[labeled],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-4, eps=1e-7),
        loss_function=LabeledLoss(),
        unlabeled_data_loader=[{"image": image}],
        unlabeled_optimizer=torch.optim.Adam(unlabeled_parameters(net), 1e-4, eps=1e-7),
        unlabeled_loss_function=UnlabeledLoss(data_range=10.0),
    )
    rates = {}
    for phase, batch_data in ((LABELED, labeled), (UNLABELED, {"image": image})):
        trainer._iteration(trainer, {**batch_data, "phase": phase})
        start = time.perf_counter()
        for _ in range(steps):
            trainer._iteration(trainer, {**batch_data, "phase": phase})
        rates[phase] = steps * batch / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_training"))
    parser.add_argument("--shape", default="32,192,192")
    parser.add_argument("--labeled_volumes", type=int, default=2)
    parser.add_argument("--labeled_slices", type=int, default=12, help="annotated slices in total")
    parser.add_argument("--unlabeled", type=int, default=3, help="unlabeled tomograms per instrument")
    parser.add_argument("--test_volumes", type=int, default=2, help="held-out tomograms per instrument")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--patch_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--labeled_repeats", type=int, default=6)
    parser.add_argument("--unlabeled_steps_per_epoch", type=int, default=18, help="0: one full pass")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", default="8,64", help="widths for the throughput figures")
    parser.add_argument("--throughput_patch", type=int, default=256)
    parser.add_argument("--throughput_steps", type=int, default=3)
    parser.add_argument("--skip_training", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}"
    )

    if not args.skip_training:
        dirs = make_data(
            args.workdir,
            args.shape,
            args.labeled_volumes,
            args.labeled_slices,
            args.unlabeled,
            args.test_volumes,
            args.seed,
        )
        info = json.loads((args.workdir / "data.done").read_text())
        print(
            f"data: shape {args.shape}; {info['annotated_slices']} annotated bessy slices in "
            f"{args.labeled_volumes} tomograms; unlabeled: {args.unlabeled} bessy + {args.unlabeled} "
            f"mistral tomograms; held out: {args.test_volumes} bessy + {args.test_volumes} mistral "
            "(fully labeled)"
        )
        print(
            f"training: width {args.width}, {args.epochs} epochs, crops {args.patch_size}, batch "
            f"{args.batch_size}, labeled repeats {args.labeled_repeats}, lr {args.learning_rate}, "
            f"final weights (no model selection)"
        )
        results = {arm: train_and_score(args, dirs, arm == "semi") for arm in ("semi", "supervised")}
        print("\n| arm | test set | precision | recall | F1 | Dice (tanh>0) | image acc. | train s |")
        print("|---|---|---|---|---|---|---|---|")
        for arm, res in results.items():
            for name in ("test_bessy", "test_mistral"):
                s = res[name]
                print(
                    f"| {arm} | {name[5:]} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
                    f"{s['dice']:.3f} | {s['image_accuracy']:.3f} | {res['train_s']:.0f} |"
                )
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nthroughput (crops/s, {args.throughput_patch}x{args.throughput_patch}, batch 1, CPU):")
    print("| width | labeled step | unlabeled step |")
    print("|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        rates = throughput(width, args.throughput_patch, 1, args.throughput_steps)
        print(f"| {width} | {rates[LABELED]:.2f} | {rates[UNLABELED]:.2f} |")


if __name__ == "__main__":
    main()
