"""Smoke test of bench/bench_generalisation.py: guards the benchmark against drift of the simulator's,
the bundle command's and the metrics' APIs on one tiny condition (a few seconds of simulation and
one inference run), and checks the assumption behind its flipped conditions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_generalisation.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow  # one simulation and one real bundle run: ~15 s idle, ~40 s on a busy 2-core machine
def test_one_condition_end_to_end(tmp_path: Path, weights: Path) -> None:
    import mrcfile

    from cryosxt_sim.simulate import get_instrument, simulate_tomogram

    out = run("--weights", f"tiny={weights}", "--shape", "16,64,64", "--conditions", "bessy", "--seeds", "1",
              "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"),
              "--option", "tiny:threshold=0.0")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "| condition | voxel nm | polarity | tiny |" in lines
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| bessy")}
    assert set(rows) == {"bessy", "bessy-flip", "bessy-pair-9.8nm", "bessy-pair-19.6nm"}
    assert "| 9.8 | bright |" in rows["bessy"] and "| 9.8 | dark |" in rows["bessy-flip"]
    assert "| 9.8 | bright |" in rows["bessy-pair-9.8nm"] and "| 19.6 | bright |" in rows["bessy-pair-19.6nm"]
    assert any("voxel-size pairs show the same phantom" in line for line in lines)
    for key in ("(a) presets, tiny:", "(b) inversion, tiny:", "(c) voxel size, tiny:"):
        assert any(line.startswith(f"- {key}") for line in lines), key

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["arms"][0]["options"] == {"threshold": "0.0"}
    for name, result in report["results"]["tiny"].items():
        assert 0.0 <= result["dice"] <= 1.0 and 0.0 <= result["f1"] <= 1.0, name
    assert report["tomograms"]["bessy-pair-19.6nm_s1000"]["shape"] == [8, 32, 32]
    assert report["tomograms"]["bessy-pair-9.8nm_s1000"]["shape"] == [16, 64, 64]

    # The flipped tomogram is the native one negated, and that is what the simulator writes for the
    # preset with the opposite polarity (the benchmark relies on it instead of simulating it again).
    images = sorted((tmp_path / "cache").glob("sim-*/16x64x64/images/*.mrc"))
    names = ["bessy-flip_s1000.mrc", "bessy-pair-9.8nm_s1000.mrc", "bessy_s1000.mrc"]
    assert [p.name for p in images] == names
    flipped, native = (mrcfile.read(p) for p in (images[0], images[2]))
    opposite = simulate_tomogram((16, 64, 64), get_instrument("bessy", polarity=-1), seed=(1000, 0, 0)).image
    np.testing.assert_array_equal(flipped, -native)
    np.testing.assert_array_equal(flipped, opposite)


def test_missing_weights_end_on_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.pt"
    out = run("--weights", f"old={missing}", "--cache", str(tmp_path / "cache"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"ERROR: --weights old={missing}: weights file not found"
    assert not (tmp_path / "cache").exists()  # nothing simulated before the options are checked
