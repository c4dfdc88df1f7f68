"""Generalisation benchmark: Dice and F1 of segmentation weights on held-out simulated tomograms
(prints a report; asserts nothing about accuracy).

    python bench/bench_generalisation.py --weights old=bundle/models/model.pt --tta
    python bench/bench_generalisation.py --weights old=bundle/models/model.pt --weights new=runs/r/model.pt \\
        --tta --option new:match_voxel_size=true --json accuracy.json

Held-out seeds: training data (and its validation split) are simulated with ``--seed`` below 1000;
the benchmark's tomogram k of every condition has the simulator seed key (1000 + k, 0, 0), i.e. what
``python -m cryosxt_sim --seed 1000+k --count 1`` writes. Conditions: each preset at its own
polarity and flipped (the same tomogram negated, which is exactly what the preset with the opposite
polarity simulates: polarity is the reconstruction's last multiplication), the ``random``
instrument, and the voxel-size pair: one ``bessy`` phantom simulated at 9.8 nm and at 19.6 nm over the
same field of view (``cryosxt_sim.paired``: same objects in the same places, the coarse one binned).

Inference runs through the real ``python -m monai.bundle run inference`` command, one process per
arm over every tomogram: that is what users run (option parsing included), and start-up costs a few
seconds per arm against minutes of inference. Simulated tomograms are cached under ``--cache``,
keyed by the simulator's source hash, the shape, the condition and the seed, so reruns only pay for
inference. Metrics are the project's (``scripts.train.metrics``): Dice of the mask (tanh > 0) and the
paper's F1 at tanh > 0.9, per tomogram over all its voxels, averaged per condition.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE), str(REPO)]  # the bundle's scripts, the simulator

from scripts.io.atomic import atomic_output  # noqa: E402
from scripts.io.volume import open_volume, write_volume  # noqa: E402
from scripts.train.metrics import label_counts, label_scores  # noqa: E402

from cryosxt_sim.instruments import INSTRUMENTS, get_instrument  # noqa: E402
from cryosxt_sim.paired import simulate_pair  # noqa: E402
from cryosxt_sim.simulate import simulate_tomogram  # noqa: E402

SEED_BASE = 1000  # training uses --seed < 1000; the benchmark's tomogram k uses (SEED_BASE + k, 0, 0)
PRESETS = tuple(INSTRUMENTS)
DEFAULT_SHAPE = "16,160,160"  # the shipped weights with and without TTA: 17 min on 2 busy cores
PAIR_FINE = "bessy-pair-9.8nm"  # the voxel-size pair: one phantom at 9.8 nm ...
COARSE = "bessy-pair-19.6nm"  # ... and at 19.6 nm over the same field of view
PRESET_FLOOR, HELDOUT_FLOOR, INVERSION_FLOOR, VOXEL_GAP = 0.6, 0.5, 0.9, 0.1
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cryosxt-bench"
INFERENCE = BUNDLE / "configs" / "inference.json"


class BenchError(ValueError):
    """Bad options or a failed step; the message names what and why."""


@dataclass(frozen=True)
class Condition:
    """One row of the table: an instrument, maybe flipped or at another voxel size."""

    id: str
    instrument: str
    flipped: bool = False
    shape_divisor: int = 1  # the coarse condition keeps the field of view: shape / 2
    paired: bool = False  # one half of the voxel-size pair (simulated together)


def all_conditions() -> list[Condition]:
    conds = []
    for name in PRESETS:
        conds += [Condition(name, name), Condition(f"{name}-flip", name, flipped=True)]
    return [
        *conds,
        Condition("random", "random"),
        Condition(PAIR_FINE, "bessy", paired=True),
        Condition(COARSE, "bessy", shape_divisor=2, paired=True),
    ]


@dataclass
class Arm:
    """One column: weights, TTA and extra inference options."""

    name: str
    weights: Path
    tta: bool
    options: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- the cache
def simulator_hash() -> str:
    """Hash of the simulator's sources: a changed simulator never reuses stale tomograms."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "cryosxt_sim").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


class Cache:
    """Simulated tomograms on disk: ROOT/sim-HASH/ZxYxX/{images,labels,meta}/COND_sSEED.*"""

    def __init__(self, root: Path, shape: tuple[int, int, int]) -> None:
        self.root = root / f"sim-{simulator_hash()}"
        self.shape = shape
        self.simulated = 0

    def folder(self, cond: Condition) -> Path:
        z, y, x = (s // cond.shape_divisor for s in self.shape)
        return self.root / f"{z}x{y}x{x}"

    def paths(self, cond: Condition, seed: int) -> dict[str, Path]:
        base, name = self.folder(cond), f"{cond.id}_s{seed}"
        return {
            "image": base / "images" / f"{name}.mrc",
            "label": base / "labels" / f"{name}.mrc",
            "meta": base / "meta" / f"{name}.json",
        }

    def get(self, cond: Condition, seed: int) -> dict[str, Path]:
        """The cached files of (condition, seed), simulated first if missing. The meta file is written
        last (every write is atomic), so a killed run never leaves a tomogram that looks complete."""
        paths = self.paths(cond, seed)
        if paths["meta"].is_file() and paths["image"].is_file() and paths["label"].is_file():
            return paths
        if cond.flipped:  # -x of the native tomogram: bit for bit what the opposite polarity simulates
            native = self.get(Condition(cond.instrument, cond.instrument), seed)
            meta = json.loads(native["meta"].read_text())
            vol = open_volume(native["image"])
            image = -np.asarray(vol.data, dtype=np.float32)
            label = np.asarray(open_volume(native["label"]).data)
            meta.update(condition=cond.id, polarity=-meta["polarity"], derived=f"-{native['image'].name}")
            meta["instrument"]["polarity"] = meta["polarity"]
            voxel = meta["voxel_size_nm"]
        elif cond.paired:  # both halves at once: one phantom, two voxel sizes
            fine, coarse = simulate_pair(self.shape, cond.instrument, seed=(seed, 0, 0))
            self.simulated += 2
            other = PAIR_FINE if cond.id == COARSE else COARSE
            twin = next(c for c in all_conditions() if c.id == other)
            self._store(self.paths(twin, seed), *_record(coarse if cond.id == PAIR_FINE else fine, other, seed))
            image, label, voxel, meta = _record(fine if cond.id == PAIR_FINE else coarse, cond.id, seed)
        else:
            shape = tuple(s // cond.shape_divisor for s in self.shape)
            inst = cond.instrument if cond.instrument == "random" else get_instrument(cond.instrument)
            tomo = simulate_tomogram(shape, inst, seed=(seed, 0, 0))
            self.simulated += 1
            image, label, voxel, meta = _record(tomo, cond.id, seed)
        self._store(paths, image, label, voxel, meta)
        return paths

    @staticmethod
    def _store(paths: dict[str, Path], image: np.ndarray, label: np.ndarray, voxel: float, meta: dict) -> None:
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        write_volume(paths["image"], image, voxel)
        write_volume(paths["label"], label.astype(np.uint8), voxel)
        with atomic_output(paths["meta"]) as tmp:  # last: the mark of a complete entry
            tmp.write_text(json.dumps(meta))


def _record(tomo, cond_id: str, seed: int) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(image, label, voxel size, meta) of a simulated tomogram, for the cache."""
    ins = tomo.info["instrument"]
    meta = {
        "condition": cond_id,
        "seed_key": [seed, 0, 0],
        "shape": list(tomo.image.shape),
        "voxel_size_nm": tomo.voxel_size_nm,
        "polarity": ins["polarity"],
        "cell_kind": tomo.info.get("cell_kind"),
        "held_out": tomo.info.get("held_out"),
        "instrument": ins,
        "objects": tomo.objects,
    }
    return tomo.image, tomo.membrane, tomo.voxel_size_nm, meta


# --------------------------------------------------------------------------------------------- inference
def run_arm(arm: Arm, inputs: Path, out: Path) -> float:
    """Segment every tomogram in ``inputs`` with the bundle command; seconds taken."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(INFERENCE),
        "--dataset_dir", str(inputs), "--output_dir", str(out), "--weights", str(arm.weights),
        "--formats", "['mrc']", "--probability", "float16", "--tta", "true" if arm.tta else "false",
    ]  # fmt: skip
    for key, value in arm.options.items():
        cmd += [f"--{key}", value]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            log.seek(0)
            print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
            raise BenchError(f"inference of arm {arm.name} failed (exit {code}): {shlex.join(cmd)}")
    return time.perf_counter() - start


def _tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_volume(path, check_finite=False).data, dtype=np.float32))


def score(label: torch.Tensor, mask: torch.Tensor, prob: torch.Tensor) -> dict[str, float]:
    """Dice of the written mask and the paper's F1 (tanh > 0.9) of the probability map, per tomogram."""
    dice = label_scores(label_counts(mask * 2 - 1, label))["dice"]
    f1 = label_scores(label_counts(prob * 2 - 1, label, threshold=0.9))  # prob = (tanh + 1) / 2
    return {"dice": dice, "f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"]}


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return label_scores(label_counts(a * 2 - 1, b))["dice"]


# ------------------------------------------------------------------------------------------------ report
def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe(metas: list[dict]) -> tuple[str, str]:
    """(voxel size, polarity) of a condition's tomograms, as table text."""
    voxels = sorted({round(m["voxel_size_nm"], 1) for m in metas})
    pols = sorted({m["polarity"] for m in metas})
    voxel = f"{voxels[0]:g}" if len(voxels) == 1 else ", ".join(f"{v:g}" for v in voxels)
    pol = {1: "bright", -1: "dark"}
    return voxel, pol[pols[0]] if len(pols) == 1 else "/".join(pol[p] for p in [m["polarity"] for m in metas])


def verdict(value: float, floor: float, higher: bool = True) -> str:
    ok = value >= floor if higher else value <= floor
    gap = abs(value - floor)
    return f"PASS (by {gap:.3f})" if ok else f"MISS (by {gap:.3f})"


def targets(arm: str, table: dict, masks: dict, conds: list[Condition], seeds: list[int]) -> dict:
    """The issue's three targets for one arm, as text lines and numbers."""
    out: dict[str, Any] = {}
    ids = {c.id for c in conds}
    presets = [c for c in conds if c.instrument in PRESETS and not c.paired and c.id != "heldout"]
    if presets:
        worst = min(presets, key=lambda c: table[c.id][arm]["dice"])
        value = table[worst.id][arm]["dice"]
        line = f"worst preset {worst.id} Dice {value:.3f} vs >= {PRESET_FLOOR}: {verdict(value, PRESET_FLOOR)}"
        if "heldout" in ids:
            held = table["heldout"][arm]["dice"]
            line += f"; heldout (never drawn) {held:.3f} vs >= {HELDOUT_FLOOR}: {verdict(held, HELDOUT_FLOOR)}"
        out["a"] = {
            "line": line,
            "worst": worst.id,
            "worst_dice": value,
            "heldout_dice": table.get("heldout", {}).get(arm, {}).get("dice"),
        }
    pairs = []
    for c in conds:
        if c.flipped and c.instrument in ids:
            for s in seeds:
                pairs.append((c.instrument, mask_dice(masks[arm][f"{c.instrument}_s{s}"], masks[arm][f"{c.id}_s{s}"])))
    if pairs:
        mean = float(np.mean([d for _, d in pairs]))
        worst = min(pairs, key=lambda p: p[1])
        out["b"] = {
            "line": f"Dice(mask(x), mask(-x)) mean {mean:.3f} over {len(pairs)} pairs (worst "
            f"{worst[1]:.3f}, {worst[0]}) vs >= {INVERSION_FLOOR}: {verdict(mean, INVERSION_FLOOR)}",
            "mean": mean,
            "pairs": pairs,
        }
    if COARSE in ids and PAIR_FINE in ids:
        fine, coarse = table[PAIR_FINE][arm]["dice"], table[COARSE][arm]["dice"]
        gap = abs(fine - coarse)
        out["c"] = {
            "line": f"bessy Dice {fine:.3f} at 9.8 nm, {coarse:.3f} at 19.6 nm: difference {gap:.3f} vs "
            f"<= {VOXEL_GAP}: {verdict(gap, VOXEL_GAP, higher=False)} (one phantom at both sizes)",
            "fine": fine,
            "coarse": coarse,
            "difference": gap,
        }
    return out


def same_phantom(fine: dict, coarse: dict) -> tuple[bool, str]:
    """Whether two tomograms show the same objects (kinds in order, centres within one coarse voxel)."""
    a, b = fine["objects"], coarse["objects"]
    if [o["kind"] for o in a] != [o["kind"] for o in b]:
        return False, f"{len(a)} vs {len(b)} objects"
    tol = coarse["voxel_size_nm"]
    for oa, ob in zip(a, b, strict=True):
        for key in ("center_nm", "start_nm"):
            if key in oa and np.max(np.abs(np.subtract(oa[key], ob[key]))) > tol:
                return False, f"object {oa['id']} ({oa['kind']}) moved by more than {tol} nm"
    return True, f"{len(a)} objects, same kinds and places"


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="weights to benchmark (repeatable); NAME names the column",
    )
    parser.add_argument("--tta", action="store_true", help="also run every weights with TTA (column NAME+tta)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[ARM:]KEY=VALUE",
        help="inference override (--KEY VALUE) for every arm, or only for ARM (an arm or weights "
        "name); e.g. match_voxel_size=true, new+tta:tta_polarity=true",
    )
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help=f"Z,Y,X of the tomograms (default {DEFAULT_SHAPE})")
    parser.add_argument("--seeds", type=int, default=2, help="held-out tomograms per condition (default 2)")
    parser.add_argument(
        "--conditions",
        default=None,
        help="comma-separated condition ids or preset names (default: all): "
        + ", ".join(c.id for c in all_conditions()),
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"simulated tomograms (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--keep", type=Path, default=None, help="keep the segmentations in this folder")
    return parser.parse_args(argv)


def build_arms(args: argparse.Namespace) -> list[Arm]:
    weights: dict[str, Path] = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[\w.-]+", name):
            raise BenchError(f"--weights {item!r}: expected NAME=PATH with NAME of letters, digits, . _ -")
        if not Path(path).expanduser().is_file():
            raise BenchError(f"--weights {name}={path}: weights file not found")
        weights[name] = Path(path).expanduser().resolve()
    arms = [
        arm for n, p in weights.items() for arm in [Arm(n, p, False)] + ([Arm(f"{n}+tta", p, True)] if args.tta else [])
    ]
    for item in args.option:
        target, _, setting = item.partition(":") if re.match(r"^[\w.+-]+:", item) else ("", "", item)
        key, sep, value = setting.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w#]*", key):
            raise BenchError(f"--option {item!r}: expected [ARM:]KEY=VALUE")
        chosen = [a for a in arms if not target or target in (a.name, a.name.removesuffix("+tta"))]
        if not chosen:
            raise BenchError(f"--option {item!r}: no arm named {target!r}; arms: {[a.name for a in arms]}")
        for arm in chosen:
            arm.options[key] = value
    return arms


def select(spec: str | None) -> list[Condition]:
    conds = all_conditions()
    if spec is None:
        return conds
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    # A preset name selects both polarities ("random" is both a preset-like name and an id); "bessy"
    # also selects the voxel-size pair.
    chosen = [c for c in conds if c.id in wanted or c.instrument in wanted]
    unknown = [w for w in wanted if w not in {c.id for c in conds} | set(PRESETS)]
    if unknown or not chosen:
        raise BenchError(f"--conditions: unknown {unknown}; choose from {[c.id for c in conds]}")
    return chosen


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    arms = build_arms(args)
    conds = select(args.conditions)
    shape = tuple(int(s) for s in args.shape.replace("x", ",").split(","))
    if len(shape) != 3 or min(shape) < 8:
        raise BenchError(f"--shape {args.shape!r}: expected Z,Y,X with every side >= 8")
    if min(shape) < 16 or any(s % 2 for s in shape):  # the coarse twin needs an even shape, sides >= 8
        conds = [c for c in conds if not c.paired]
    if args.seeds < 1:
        raise BenchError("--seeds must be >= 1")
    seeds = [SEED_BASE + k for k in range(args.seeds)]
    started = time.perf_counter()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0 = os.getloadavg()[0]

    cache = Cache(args.cache.expanduser(), shape)
    files = {f"{c.id}_s{s}": cache.get(c, s) for c in conds for s in seeds}
    metas = {n: json.loads(p["meta"].read_text()) for n, p in files.items()}
    t_sim = time.perf_counter() - started
    print(
        f"{len(files)} held-out tomograms ({cache.simulated} simulated now, the rest cached in {cache.root}) "
        f"in {t_sim:.0f} s",
        flush=True,
    )

    labels = {n: _tensor(p["label"]) for n, p in files.items()}
    masks: dict[str, dict[str, torch.Tensor]] = {}
    results: dict[str, dict[str, dict]] = {}
    arm_seconds: dict[str, float] = {}
    keep = args.keep.expanduser() if args.keep else None
    with tempfile.TemporaryDirectory(prefix="bench_generalisation_") as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        for name, p in files.items():
            (inputs / f"{name}.mrc").symlink_to(p["image"])
        for arm in arms:
            out = (keep / arm.name) if keep else Path(tmp) / arm.name
            arm_seconds[arm.name] = run_arm(arm, inputs, out)
            masks[arm.name], results[arm.name] = {}, {}
            for name in files:
                mask, prob = _tensor(out / f"{name}_mask.mrc"), _tensor(out / f"{name}_prob.mrc")
                masks[arm.name][name] = mask
                summary = json.loads((out / f"{name}_summary.json").read_text())
                results[arm.name][name] = {
                    **score(labels[name], mask, prob),
                    "summary": {k: summary[k] for k in summary if k != "weights"},
                }
            print(
                f"arm {arm.name}: {len(files)} tomograms segmented and scored in {arm_seconds[arm.name]:.0f} s",
                flush=True,
            )

    table = {
        c.id: {
            a.name: {k: float(np.mean([results[a.name][f"{c.id}_s{s}"][k] for s in seeds])) for k in ("dice", "f1")}
            for a in arms
        }
        for c in conds
    }
    goals = {a.name: targets(a.name, table, masks, conds, seeds) for a in arms}
    phantom = None
    if any(c.id == COARSE for c in conds) and any(c.id == PAIR_FINE for c in conds):
        checks = [same_phantom(metas[f"{PAIR_FINE}_s{s}"], metas[f"{COARSE}_s{s}"]) for s in seeds]
        phantom = {"same": all(ok for ok, _ in checks), "details": [d for _, d in checks]}
    total = time.perf_counter() - started

    # ---- the report
    z, y, x = shape
    print(
        f"\nHeld-out simulated tomograms, {z} x {y} x {x} voxels ({COARSE}: {z // 2} x {y // 2} x {x // 2}, "
        f"the same field of view), seeds {', '.join(map(str, seeds))} (simulator seed key (seed, 0, 0)); "
        f"{when}; {total:.0f} s\n"
    )
    print("Each cell: mean Dice (mask, tanh > 0) / mean F1 (tanh > 0.9) over the condition's tomograms.\n")
    header = ["condition", "voxel nm", "polarity", *[a.name for a in arms]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c in conds:
        voxel, pol = describe([metas[f"{c.id}_s{s}"] for s in seeds])
        cells = [f"{table[c.id][a.name]['dice']:.3f} / {table[c.id][a.name]['f1']:.3f}" for a in arms]
        print("| " + " | ".join([c.id, voxel, pol, *cells]) + " |")
    if any(c.id == "random" for c in conds):
        drawn = [
            f"{s}: {metas[f'random_s{s}']['voxel_size_nm']:g} nm "
            f"{'bright' if metas[f'random_s{s}']['polarity'] > 0 else 'dark'} "
            f"{metas[f'random_s{s}']['cell_kind']}"
            for s in seeds
        ]
        print(f"\nrandom draws: {'; '.join(drawn)}")
    print("\nTargets (issue 13; the floors are for new weights):")
    for a in arms:
        for key, text in (("a", "presets"), ("b", "inversion"), ("c", "voxel size")):
            if key in goals[a.name]:
                print(f"- ({key}) {text}, {a.name}: {goals[a.name][key]['line']}")
    if phantom is not None:
        state = "the same phantom" if phantom["same"] else "NOT the same phantom"
        print(f"- voxel-size pairs show {state} at 9.8 and 19.6 nm ({'; '.join(phantom['details'])})")
    for a in arms:
        opts = " ".join(f"--{k} {v}" for k, v in a.options.items())
        # The inference summary says whether slices were resampled to the weights' voxel size.
        resampled = sum(bool(r["summary"].get("voxel_matching", {}).get("resampled")) for r in results[a.name].values())
        print(
            f"- arm {a.name}: {a.weights}, tta {str(a.tta).lower()}{', ' + opts if opts else ''}; "
            f"{resampled} of {len(files)} tomograms resampled to the weights' voxel size; "
            f"{arm_seconds[a.name]:.0f} s"
        )
    print(
        f"- simulation {t_sim:.0f} s ({cache.simulated} new); total {total:.0f} s; "
        f"load {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, {os.cpu_count()} CPUs"
    )

    report = {
        "date": when,
        "command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "shape": list(shape),
        "seeds": seeds,
        "cache": str(cache.root),
        "seconds": {"total": total, "simulation": t_sim, **{f"arm {k}": v for k, v in arm_seconds.items()}},
        "arms": [{"name": a.name, "weights": str(a.weights), "tta": a.tta, "options": a.options} for a in arms],
        "conditions": [c.id for c in conds],
        "table": table,
        "targets": {a: {k: {kk: vv for kk, vv in v.items()} for k, v in g.items()} for a, g in goals.items()},
        "voxel_pair_same_phantom": phantom,
        "tomograms": {
            n: {
                k: metas[n][k]
                for k in ("condition", "seed_key", "shape", "voxel_size_nm", "polarity", "cell_kind")
                if k in metas[n]
            }
            for n in files
        },
        "results": results,
    }
    if args.json:
        with atomic_output(args.json.expanduser()) as tmp_json:
            tmp_json.write_text(json.dumps(report, indent=1, default=float) + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (BenchError, OSError) as err:
        sys.stdout.flush()
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
