"""Bad input and faults for the command-line runners, through the real MONAI bundle runner.

Each case must exit with status 1 (not a signal), end on one line that names the file or folder and
the problem, and leave no half-written file behind.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scripts.io.volume import write_volume

from conftest import REPO

CONFIGS = REPO / "bundle" / "configs"
MARKER_ENV = "CRYOSXT_TEST_MARKER"


def _last_line(text: str) -> str:
    # Progress bars end their lines with carriage returns: split on both.
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def _bundle(run_id: str, config: str | list[str], *args: str, env: dict | None = None):
    config_file = str(config) if isinstance(config, (str, Path)) else repr([str(c) for c in config])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _infer(tomograms: Path, out: Path, *extra: str, env: dict | None = None, **options: str | Path):
    values = {"dataset_dir": str(tomograms), "output_dir": str(out), "width": "4", **options}
    flags = [item for key, value in values.items() for item in (f"--{key}", str(value))]
    return _bundle("inference", CONFIGS / "inference.json", *flags, *extra, env=env)


def _mrc(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 98.0
    return path


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name) if folder.is_dir() else []


@contextmanager
def _tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at ``folder`` (needs root or CAP_SYS_ADMIN; the test is skipped otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class _Marker:
    """Unpickling this runs a command that creates a file: a weights file that tries to run code."""

    def __reduce__(self):
        return (os.system, (f'touch "${MARKER_ENV}"',))


@pytest.fixture
def one_tomogram(tmp_path) -> Path:
    data = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    _mrc(tmp_path / "tomograms" / "cell.mrc", data)
    return tmp_path / "tomograms"


# ----------------------------------------------------------------------------- the corpus


def _case(name: str, tmp: Path, good: Path) -> tuple[dict[str, str], list[str]]:
    """(options replacing the defaults, texts the last line must hold) for the bad input ``name``."""
    tomograms = tmp / "tomograms"
    if name == "missing folder":
        return {"dataset_dir": str(tmp / "nowhere")}, [str(tmp / "nowhere"), "does not exist"]
    if name == "empty folder":
        (tmp / "empty").mkdir()
        return {"dataset_dir": str(tmp / "empty")}, [str(tmp / "empty"), "no volume files"]
    if name == "corrupt MRC":
        (tomograms / "broken.mrc").write_bytes(b"\0" * 100)
        return {}, ["1 tomogram(s) failed", "broken.mrc", "cannot read as MRC"]
    if name == "truncated MRC":
        path = _mrc(tomograms / "short.mrc", np.zeros((4, 32, 32), np.float32))
        path.write_bytes(path.read_bytes()[:2000])
        return {}, ["short.mrc", "truncated"]
    if name == "NaN values":
        data = np.zeros((3, 32, 32), np.float32)
        data[1, 5, 5] = np.nan
        _mrc(tomograms / "nan.mrc", data)
        return {}, ["nan.mrc", "NaN"]
    if name == "2D image":
        _mrc(tomograms / "flat.mrc", np.zeros((32, 32), np.float32))
        return {}, ["flat.mrc", "2D image"]
    if name == "missing weights":
        return {"weights": str(tmp / "nope.pt")}, [str(tmp / "nope.pt"), "weights file not found"]
    if name == "not a weights file":
        (tmp / "junk.pt").write_bytes(b"this is not a checkpoint")
        return {"weights": str(tmp / "junk.pt")}, [str(tmp / "junk.pt"), "not a PyTorch weights file"]
    if name == "weights of another width":
        return {"width": "8"}, [str(good), "does not fit a width-8"]
    if name == "pickle that runs code":
        with open(tmp / "evil.pt", "wb") as f:
            pickle.dump(_Marker(), f)
        return {"weights": str(tmp / "evil.pt")}, [str(tmp / "evil.pt"), "not a PyTorch weights file"]
    if name == "bad option":
        return {"probability": "int8"}, ["probability must be null"]
    if name == "empty slice range":
        return {"slice_range": "[5, 9]"}, ["cell.mrc", "slice range [5, 9] is empty"]
    if name == "output_dir is a file":
        (tmp / "taken").write_text("a file")
        return {"output_dir": str(tmp / "taken")}, [str(tmp / "taken"), "a folder was expected"]
    raise AssertionError(name)


CORPUS = [
    "missing folder", "empty folder", "corrupt MRC", "truncated MRC", "NaN values", "2D image",
    "missing weights", "not a weights file", "weights of another width", "pickle that runs code",
    "bad option", "empty slice range", "output_dir is a file",
]  # fmt: skip


@pytest.mark.parametrize("name", CORPUS)
def test_bad_input_ends_on_one_line_naming_the_file(name, tmp_path, weights, one_tomogram):
    options, expected = _case(name, tmp_path, weights)
    out = tmp_path / "out"
    marker = tmp_path / "code_ran"
    result = _infer(one_tomogram, out, env={MARKER_ENV: str(marker)}, **{"weights": weights, **options})
    assert result.returncode == 1, result.stderr[-3000:]
    last = _last_line(result.stderr)
    assert last.startswith("ERROR: "), result.stderr[-3000:]
    for text in expected:
        assert text in last, last
    assert "Traceback" not in result.stderr and "Failed to evaluate" not in result.stderr
    assert not marker.exists()
    assert _partials(out) == []


def test_debug_option_shows_the_traceback_and_still_ends_on_the_message(tmp_path, weights, one_tomogram):
    result = _infer(tmp_path / "nowhere", tmp_path / "out", weights=weights, env={"CRYOSXT_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "find_volumes" in result.stderr
    assert _last_line(result.stderr) == f"ERROR: {tmp_path / 'nowhere'}: folder does not exist"


@pytest.mark.parametrize("workflow", ["training", "evaluating", "surfaces"])
def test_other_runners_end_on_the_message_too(workflow, tmp_path):
    missing = tmp_path / "nowhere"
    if workflow == "surfaces":
        result = _bundle("surfaces", CONFIGS / "surfaces.json", "--dataset_dir", str(missing),
                         "--output_dir", str(tmp_path / "out"))  # fmt: skip
    elif workflow == "training":
        result = _bundle("training", CONFIGS / "train.json", "--dataset_dir", str(missing),
                         "--output_dir", str(tmp_path / "out"), "--num_workers", "0")  # fmt: skip
    else:
        configs = [CONFIGS / "train.json", CONFIGS / "evaluate.json"]
        result = _bundle("evaluating", configs, "--dataset_dir", str(missing), "--ckpt_path",
                         str(tmp_path / "nope.pt"), "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = _last_line(result.stderr)
    assert last.startswith("ERROR: ") and ("nowhere" in last or "nope.pt" in last), result.stderr[-3000:]


# ----------------------------------------------------------------------------- output folders


def test_surfaces_output_dir_that_is_a_file_is_named(tmp_path):
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[1:3, 4:10, 4:10] = 1
    _mrc(tmp_path / "masks" / "cell_mask.mrc", mask)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = _bundle("surfaces", CONFIGS / "surfaces.json", "--dataset_dir", str(tmp_path / "masks"),
                     "--output_dir", str(afile))  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    expected = f"ERROR: {afile}: output_dir is an existing file; a folder was expected"
    assert _last_line(result.stderr) == expected
    assert afile.read_text() == "not a folder"


def test_read_only_output_folder_is_named(tmp_path, weights, one_tomogram):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        result = _infer(one_tomogram, folder, weights=weights)
        assert result.returncode == 1, result.stderr[-3000:]
        assert _last_line(result.stderr) == (
            f"ERROR: {folder}: cannot write into the output_dir folder (read-only file system)"
        )
        # Any writer that cannot create its temporary file names the folder, not that file.
        expected = rf"^{re.escape(str(folder))}: cannot write into this folder"
        with pytest.raises(OSError, match=expected):
            write_volume(folder / "v.mrc", np.zeros((2, 8, 8), np.uint8))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the read-only mount covers it)")
def test_output_folder_without_write_permission_is_named(tmp_path, weights, one_tomogram):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _infer(one_tomogram, folder, weights=weights)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1
    expected = f"ERROR: {folder}: cannot write into the output_dir folder (permission denied)"
    assert _last_line(result.stderr) == expected


# ----------------------------------------------------------------------------- a full disk


def test_full_disk_fails_one_tomogram_cleanly_and_goes_on(tmp_path, weights):
    rng = np.random.default_rng(1)
    tomograms = tmp_path / "tomograms"
    _mrc(tomograms / "big.mrc", rng.normal(size=(6, 256, 256)).astype(np.float32))  # 2.4 MB of outputs
    _mrc(tomograms / "small.mrc", rng.normal(size=(4, 64, 64)).astype(np.float32))
    with _tmpfs(tmp_path / "disk", "size=2m") as disk:
        out = disk / "out"
        result = _infer(tomograms, out, "--probability", "float16", weights=weights)
        assert result.returncode == 1, f"{result.returncode}: {result.stderr[-3000:]}"  # not SIGBUS (-7)
        last = _last_line(result.stderr)
        assert last.startswith(f"ERROR: 1 tomogram(s) failed: {out}: not enough free space"), last
        assert str(tomograms / "big.mrc") in last and re.search(r"[\d.]+ MB needed, [\d.]+ MB free", last)
        assert _partials(out) == []
        assert not list(out.glob("big_*"))
        assert sorted(p.name for p in out.glob("small_*")) == [
            "small_mask.mrc", "small_mask.tif", "small_prob.mrc", "small_prob.tif", "small_summary.json"
        ]  # fmt: skip


WRITE = """
import sys
import numpy as np
from scripts.io.volume import SliceWriter
with SliceWriter(sys.argv[1], (8, 512, 512), np.uint8) as writer:
    for z in range(8):
        writer.write(z, np.ones((512, 512), np.uint8))
"""


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".nii.gz"])
def test_writer_on_a_full_disk_raises_instead_of_a_bus_error(tmp_path, suffix):
    """Without the free-space check in front: the reservation of the mapped file must fail cleanly."""
    with _tmpfs(tmp_path / "disk", "size=1m") as disk:
        result = subprocess.run(
            [sys.executable, "-c", WRITE, str(disk / f"v{suffix}")], capture_output=True, text=True,
            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "bundle")},
        )  # fmt: skip
        assert result.returncode == 1, f"{result.returncode}: {result.stderr[-2000:]}"
        assert f"DiskSpaceError: {disk}: not enough free space for v" in _last_line(result.stderr)
        assert list(disk.iterdir()) == []
