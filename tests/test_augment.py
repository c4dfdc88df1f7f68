"""The instrument-robust training recipe: train.json's augmentations, their switches and the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import (
    Compose,
    EnsureTyped,
    NormalizeIntensityd,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandSpatialCropd,
    RandZoomd,
    SpatialPadd,
)
from scripts.io.volume import write_volume
from scripts.train.augment import check_recipe
from scripts.train.slices import LoadSliced

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
GEOMETRY = (RandSpatialCropd, RandRotate90d, RandFlipd)  # the paper's own random transforms
PATCH = 48


def _parser(reference: bool = False, **overrides) -> ConfigParser:
    parser = ConfigParser()
    files = [str(CONFIGS / "train.json"), *([str(CONFIGS / "reference_recipe.json")] if reference else [])]
    parser.read_config(files)
    parser.update({"patch_size": PATCH, **overrides})
    return parser


def _aug_prob_keys() -> list[str]:
    config = json.loads((CONFIGS / "train.json").read_text())
    return sorted(k for k in config if k.startswith("aug_") and k.endswith("_prob"))


def _pipeline(reference: bool = True, **overrides) -> Compose:
    return _parser(reference, **overrides).get_parsed_content("train#preprocessing")


def _seed(compose: Compose, seed: int = 3) -> Compose:
    """Seed each random transform by its type and rank among transforms of that type, so two pipelines
    that differ only by a transform present or absent draw the same crops, rotations and flips."""
    seen: dict[str, int] = {}
    for t in compose.transforms:
        if isinstance(t, Randomizable):
            name = type(t).__name__
            seen[name] = seen.get(name, 0) + 1
            t.set_random_state(seed=seed + 1000 * seen[name] + sum(map(ord, name)))
    return compose


def _paper_pipeline() -> Compose:
    """The paper's recipe as train.json had it before the robust recipe (label padded with 0)."""
    keys = ["image", "label", "mask"]
    return Compose(
        [
            LoadSliced(keys=["image", "label"], allow_missing_keys=True),
            NormalizeIntensityd(keys="image", channel_wise=True),
            SpatialPadd(keys=keys, spatial_size=[PATCH, PATCH], allow_missing_keys=True),
            RandSpatialCropd(keys=keys, roi_size=[PATCH, PATCH], random_size=False, allow_missing_keys=True),
            RandRotate90d(keys=keys, prob=0.75, max_k=3, allow_missing_keys=True),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
            EnsureTyped(keys=keys, track_meta=False, allow_missing_keys=True),
        ]
    )


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """A labeled slice smaller than the crop on one axis, and an unlabeled one larger than it."""
    root = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(3, 40, 60)) * 5 + 100).astype(np.float32)  # raw, far from standardised
    label = (image > 103).astype(np.uint8)
    label[:, :6] = 255
    write_volume(root / "i.mrc", image, 10.0)
    write_volume(root / "l.mrc", label, 10.0)
    write_volume(root / "u.mrc", rng.normal(size=(2, 70, 64)).astype(np.float32), 10.0)
    return [
        {"image": str(root / "i.mrc"), "label": str(root / "l.mrc"), "z": 1},
        {"image": str(root / "u.mrc"), "z": 0},
    ]


def _run(compose: Compose, items: list[dict], draws: int = 6) -> list[dict]:
    return [compose(dict(item)) for _ in range(draws) for item in items]


# ----------------------------------------------------------------------------- switches


def _is_augmentation(t: object) -> bool:
    return hasattr(t, "prob") and not isinstance(t, GEOMETRY)


def test_every_augmentation_has_its_own_key_and_the_reference_turns_all_off():
    keys = _aug_prob_keys()
    assert {
        "aug_invert_prob",
        "aug_zoom_prob",
        "aug_blur_prob",
        "aug_contrast_prob",
        "aug_noise_prob",
        "aug_scale_prob",
        "aug_shift_prob",
    } <= set(keys)
    marks = {k: (i + 1) / 100 for i, k in enumerate(keys)}  # a distinct probability per key
    robust = [t for t in _pipeline(False, **marks).transforms if _is_augmentation(t)]
    assert sorted(float(t.prob) for t in robust) == sorted(marks.values())  # one transform per key
    default = _parser(False)
    assert default.get_parsed_content("recipe") == "robust"
    assert default.get_parsed_content("aug_invert_prob") == 0.5
    assert all(default.get_parsed_content(k) > 0 for k in keys)

    reference = _parser(True)
    assert reference.get_parsed_content("recipe") == "reference"
    assert all(reference.get_parsed_content(k) == 0 for k in keys)
    off = [t for t in _pipeline(True).transforms if _is_augmentation(t)]
    assert len(off) == len(keys) and all(t.prob == 0 for t in off)


def test_reference_recipe_is_the_paper_pipeline(slices: list[dict]):
    ours = _run(_seed(_pipeline(True)), slices)
    paper = _run(_seed(_paper_pipeline()), slices)
    for a, b in zip(ours, paper, strict=True):
        assert torch.equal(a["image"], b["image"])
        if "label" in b:
            assert torch.equal(a["mask"], b["mask"])
            annotated = b["mask"] > 0
            assert torch.equal(a["label"][annotated], b["label"][annotated])
            assert set(a["label"].unique().tolist()) <= {-1.0, 1.0}  # padding: background, not 0


@pytest.mark.parametrize("key", _aug_prob_keys())
def test_each_augmentation_switched_off_is_as_if_absent(key: str, slices: list[dict]):
    everything = {k: 1.0 for k in _aug_prob_keys()}  # everything on, then this one off
    marked = _pipeline(False, **{**everything, key: 0.37}).transforms
    (index,) = [i for i, t in enumerate(marked) if getattr(t, "prob", None) == 0.37]
    switched_off = _pipeline(False, **{**everything, key: 0.0})
    removed = Compose([t for i, t in enumerate(_pipeline(False, **{**everything, key: 0.0}).transforms) if i != index])
    for a, b in zip(_run(_seed(switched_off), slices, 3), _run(_seed(removed), slices, 3), strict=True):
        assert a.keys() == b.keys()
        for k in ("image", "label", "mask"):
            if k in a:
                assert torch.equal(a[k], b[k]), k
    # and on, it changes the image (the switch is live)
    on = _run(_seed(_pipeline(True, **{key: 1.0})), slices, 2)
    ref = _run(_seed(_pipeline(True)), slices, 2)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(on, ref, strict=True))


# ----------------------------------------------------------------------------- what each one does


def test_inversion_negates_the_standardised_image_exactly(slices: list[dict]):
    inverted = _run(_seed(_pipeline(True, aug_invert_prob=1.0)), slices)
    reference = _run(_seed(_pipeline(True)), slices)
    for a, b in zip(inverted, reference, strict=True):
        assert torch.equal(a["image"], -b["image"])
        assert abs(float(b["image"].mean())) < 0.5  # it negates the standardised slice, not raw values
        for k in ("label", "mask"):
            if k in b:
                assert torch.equal(a[k], b[k])


def test_image_only_augmentations_leave_label_and_mask_alone(slices: list[dict]):
    image_only = {k: 1.0 for k in _aug_prob_keys() if k != "aug_zoom_prob"}
    augmented = _run(_seed(_pipeline(True, **image_only)), slices[:1])
    reference = _run(_seed(_pipeline(True)), slices[:1])
    for a, b in zip(augmented, reference, strict=True):
        assert not torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["mask"], b["mask"])


def _centroid(m: torch.Tensor) -> np.ndarray:
    return np.argwhere(m[0].numpy()).mean(axis=0)


def test_zoom_keeps_label_values_and_follows_the_image_geometry():
    """A bright disc labelled membrane and a dark disc left unannotated: after the configured zoom,
    the label's disc and the mask's hole sit where the image's two discs are."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 24.3) ** 2 + (xx - 37.6) ** 2 < 13**2
    hole = (yy - 49.2) ** 2 + (xx - 14.7) ** 2 < 9**2  # the unannotated patch: a dark disc
    image = torch.from_numpy((disc.astype(np.float32) - hole.astype(np.float32))[None])
    label = torch.from_numpy(np.where(disc, 1.0, -1.0).astype(np.float32)[None])
    mask = torch.from_numpy((~hole).astype(np.float32)[None])
    zooms = [t for t in _pipeline(True, aug_zoom_prob=1.0).transforms if isinstance(t, RandZoomd)]
    (zoom,) = zooms
    zoom.set_random_state(seed=0)
    factors = []
    for _ in range(60):
        d = zoom({"image": image.clone(), "label": label.clone(), "mask": mask.clone()})
        shape = d["image"].shape
        assert d["label"].shape == d["mask"].shape == shape
        factors.append(shape[-1] / size)
        assert set(d["label"].unique().tolist()) <= {-1.0, 1.0}
        assert set(d["mask"].unique().tolist()) <= {0.0, 1.0}
        pairs = ((d["image"] > 0.5, d["label"] > 0, disc), (d["image"] < -0.5, d["mask"] == 0, hole))
        for seen, truth, source in pairs:
            # the object's centre mapped through the zoom (pixel centres: (c + 0.5) * f - 0.5); MONAI's
            # legacy "nearest" is off by up to half a pixel of the input, "nearest-exact" is not
            expected = (np.argwhere(source).mean(axis=0) + 0.5) * shape[-1] / size - 0.5
            assert np.abs(_centroid(truth) - expected).max() < 0.45
            assert np.abs(_centroid(seen) - _centroid(truth)).max() < 0.45
            # disagreement only along the edge: fewer pixels than the outline has
            assert int((seen != truth).sum()) <= 2 * (shape[-1] / size) * 4 * 14
    assert 0.5 <= min(factors) < 0.6 and 1.9 < max(factors) <= 2.0  # a 4x range of voxel sizes


@pytest.mark.parametrize("zoom_range", [[0.5, 0.5], [2.0, 2.0], [0.5, 2.0]])
def test_crop_is_always_patch_size_with_everything_on(zoom_range: list[float], slices: list[dict]):
    everything = {k: 1.0 for k in _aug_prob_keys()}
    compose = _seed(_pipeline(False, aug_zoom_range=zoom_range, **everything))
    for d in _run(compose, slices, 5):
        assert d["image"].shape == (1, PATCH, PATCH) and torch.isfinite(d["image"]).all()
        if "label" in d:
            assert d["label"].shape == d["mask"].shape == (1, PATCH, PATCH)
            assert set(d["label"].unique().tolist()) <= {-1.0, 1.0}
            assert set(d["mask"].unique().tolist()) <= {0.0, 1.0}


def test_recipe_names_are_checked():
    record = check_recipe("robust", {"aug_invert_prob": 0.5, "aug_zoom_range": (0.5, 2.0)})
    assert record == {"recipe": "robust", "aug_invert_prob": 0.5, "aug_zoom_range": [0.5, 2.0]}
    with pytest.raises(ValueError, match=r"recipe 'reference' with aug_invert_prob=0.5: .*reference_recipe"):
        check_recipe("reference", {"aug_invert_prob": 0.5, "aug_zoom_prob": 0.0})
    with pytest.raises(ValueError, match="recipe 'fancy'"):
        check_recipe("fancy", {})
    with pytest.raises(ValueError, match="aug_noise_prob 1.5"):
        check_recipe("robust", {"aug_noise_prob": 1.5})
    with pytest.raises(ValueError, match=r"aug_zoom_range \[2.0, 0.5\]"):
        check_recipe("robust", {"aug_zoom_range": [2.0, 0.5]})


# ----------------------------------------------------------------------------- the bundle runner


def _bundle(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cryosxt_sim.simulate import main as simulate

    root = tmp_path_factory.mktemp("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate(out=str(root), count=2, shape="8,64,64", seed=0, instrument="bessy", unlabeled=1)
    return root


def test_robust_recipe_trains_one_epoch_and_is_recorded(tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "run"
    _bundle(
        [
            "--config_file",
            str(CONFIGS / "train.json"),
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(out),
            "--train#trainer#max_epochs",
            "1",
            "--width",
            "4",
            "--patch_size",
            "64",
            "--num_workers",
            "1",
            "--progress_bar",
            "false",
            "--labeled_repeats",
            "1",
        ]
    )
    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"] == "robust" and record["aug_invert_prob"] == 0.5
    assert record["aug_zoom_range"] == [0.5, 2.0]
    (epoch,) = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert np.isfinite(epoch["train_labeled_loss"]) and np.isfinite(epoch["train_unlabeled_loss"])
    assert (out / "last.pt").is_file()


def test_recipe_reference_without_its_config_stops_before_training(tiny_dataset: Path, tmp_path: Path):
    proc = _bundle(
        [
            "--config_file",
            str(CONFIGS / "train.json"),
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(tmp_path / "run"),
            "--recipe",
            "reference",
            "--num_workers",
            "0",
            "--width",
            "4",
        ],
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: recipe 'reference' with aug_zoom_prob=0.5")
    assert "reference_recipe.json" in last
    assert not (tmp_path / "run" / "last.pt").exists()
