"""The ``adapting`` workflow: zero-label adaptation to a new microscope, through the real bundle runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.io.weights_metadata import read_metadata
from scripts.train.adapt import ADAPTED, REPORT, source_dataset
from scripts.train.dataset import list_training_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = f"['{REPO / 'bundle/configs/train.json'}','{REPO / 'bundle/configs/adapt.json'}']"
TINY = [
    "--patch_size",
    "64",
    "--batch_size",
    "2",
    "--num_workers",
    "0",
    "--progress_bar",
    "false",
    "--unlabeled_steps_per_epoch",
    "3",
    "--report_slices",
    "2",
]


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "adapting", "--config_file", CONFIGS, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labeled bessy source data; the 'new microscope' (inverted, coarser) as unlabeled tomograms and as
    a labeled check set."""
    from cryosxt_sim.simulate import main as simulate

    root = tmp_path_factory.mktemp("adapt")
    simulate(out=str(root / "source"), count=2, shape="8,64,64", seed=3, instrument="bessy")
    simulate(out=str(root / "new"), count=1, shape="8,64,64", seed=4, instrument="labsource", unlabeled=2)
    return {"source": root / "source", "unlabeled": root / "new" / "unlabeled", "check": root / "new"}


def test_adapting_runs_end_to_end_and_reports_before_and_after(folders, weights: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = _run(
        "--init_weights",
        str(weights),
        "--dataset_dir",
        str(folders["source"]),
        "--unlabeled_dir",
        str(folders["unlabeled"]),
        "--check_dir",
        str(folders["check"]),
        "--output_dir",
        str(out),
        "--adapt_epochs",
        "2",
        *TINY,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "training starts from the weights of" in log

    adapted = out / ADAPTED
    state = torch.load(adapted, weights_only=True)
    start = torch.load(weights, weights_only=True)
    assert any(not torch.equal(state[k], start[k]) for k in start)  # it trained
    meta = read_metadata(adapted)
    assert meta is not None and meta.width == 4
    # adapt.json's default self-training: the interior slices 1-5 of each 8-slice tomogram
    pseudo = "(self-trained on pseudo labels of 10 slices)"
    assert meta.adapted_to == f"2 unlabeled tomograms in {folders['unlabeled'].resolve()} {pseudo}"
    for tomogram in folders["unlabeled"].glob("*.mrc"):
        assert (out / "pseudo_labels" / tomogram.name).is_file()
    assert meta.init_weights.startswith("w4.pt (sha256 ")

    report = json.loads((out / REPORT).read_text())
    assert report["epochs"] == 2
    assert sorted(report["tomograms"]) == sorted(p.name for p in folders["unlabeled"].glob("*.mrc"))
    for when in ("before", "after"):
        errors = report[when]["reconstruction_error"]
        assert set(errors) == set(report["tomograms"]) and all(v >= 0 for v in errors.values())
        assert 0.0 <= report[when]["dice"] <= 1.0
    assert report["before"] != report["after"]
    assert "median reconstruction error" in log and f"Dice on {folders['check']}" in log


def test_adapting_without_unlabeled_dir_stops_with_one_clear_line(folders, weights: Path, tmp_path: Path):
    proc = _run(
        "--init_weights",
        str(weights),
        "--dataset_dir",
        str(folders["source"]),
        "--output_dir",
        str(tmp_path / "run"),
        *TINY,
    )
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "adapting needs --unlabeled_dir" in last, last
    assert not (tmp_path / "run" / ADAPTED).exists()


def test_source_data_are_simulated_once_with_interior_slices_annotated(tmp_path: Path):
    folder = Path(source_dataset(tmp_path, count=1, shape="10,48,48", seed=7))
    labeled, unlabeled = list_training_data(folder)
    assert len(labeled) == 1 and not unlabeled
    assert labeled[0].annotated_slices == list(range(2, 8))  # 20 %..80 % of 10 slices

    def stamp() -> tuple:
        return (folder / "images").stat().st_mtime_ns, sorted(p.name for p in (folder / "images").iterdir())

    first = stamp()
    assert Path(source_dataset(tmp_path, count=1, shape="10,48,48", seed=7)) == folder
    assert stamp() == first  # reused, not simulated again
    shutil.rmtree(folder / "images")
    (folder / "source.json").unlink()  # an incomplete set (no marker) is made again
    assert len(list_training_data(source_dataset(tmp_path, count=1, shape="10,48,48", seed=7))[0]) == 1


@pytest.mark.slow  # two tiny adaptations and three inference arms through the real commands: ~2 min
def test_adaptation_benchmark_runs_on_tiny_data(folders, weights: Path, tmp_path: Path):
    script = REPO / "bench" / "bench_adaptation.py"
    args = [
        "--weights",
        str(weights),
        "--seeds",
        "1",
        "--unlabeled",
        "1",
        "--unlabeled-shape",
        "8,64,64",
        "--shape",
        "16,64,64",
        "--epochs",
        "1",
        "--source",
        str(folders["source"]),
        "--work",
        str(tmp_path),
        "--json",
        str(tmp_path / "r.json"),
    ]
    for option in ("patch_size=64", "batch_size=2", "num_workers=0", "unlabeled_steps_per_epoch=2", "report_slices=2"):
        args += ["--option", option]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| before |") for line in lines)
    assert any(line.startswith("| adapt |") for line in lines) and any(line.startswith("| control |") for line in lines)
    assert any(line.startswith("- Dice after adaptation") for line in lines)
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    control = read_metadata(tmp_path / "runs" / "control_s0" / "e1" / ADAPTED)
    adapted = read_metadata(tmp_path / "runs" / "adapt_s0" / "e1" / ADAPTED)
    assert adapted.adapted_to.startswith("1 unlabeled") and control.adapted_to.startswith("0 unlabeled")
    for arm in ("before", "adapt", "control"):
        assert len(summary["arms"][arm]["dice"]) == 1 and summary["arms"][arm]["ood_held_out"][0] is not None
