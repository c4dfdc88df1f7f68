"""Class-balanced pseudo labels (``scripts.train.pseudo_labels``): adaptation's self-training labels."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from scripts.io.labels import IGNORE_VALUE, MEMBRANE, canonical_labels
from scripts.network.dihedral import dihedral_mean
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.train.adapt import adaptation_data
from scripts.train.dataset import list_training_data, slice_items
from scripts.train.pseudo_labels import FOLDER, class_balanced_labels, membrane_prior, write_pseudo_labels
from scripts.train.workflow import standardise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_labels_follow_the_rank_of_the_teacher_output_per_class():
    soft = np.random.default_rng(0).permutation(np.linspace(-1, -0.2, 400)).reshape(20, 20)  # all below 0
    labels = class_balanced_labels(soft, prior=0.1, keep=0.5)
    membrane, background = labels == MEMBRANE, labels == 0
    assert membrane.sum() == 20 and background.sum() == 180  # 0.1 * 0.5 and 0.9 * 0.5 of 400
    assert soft[membrane].min() > soft[labels == IGNORE_VALUE].max() > soft[background].max()
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, MEMBRANE, IGNORE_VALUE}
    with pytest.raises(ValueError, match="membrane prior"):
        class_balanced_labels(soft, prior=0.0)
    with pytest.raises(ValueError, match="pseudo_label_keep"):
        class_balanced_labels(soft, prior=0.1, keep=1.5)


def _tomogram(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = 200.0
    return path


def test_written_labels_are_the_teachers_ranks_on_interior_slices_and_reused(tmp_path: Path, weights: Path):
    data = np.random.default_rng(2).normal(size=(10, 48, 48))
    tomogram = _tomogram(tmp_path / "new" / "t.mrc", data)
    out = tmp_path / "run"
    (labeled,) = write_pseudo_labels(weights, [tomogram], out, prior=0.2, keep=0.5)
    assert labeled.image == tomogram and labeled.label == out / FOLDER / "t.mrc"
    assert labeled.annotated_slices == list(range(2, 8))  # the interior 20 %..80 % of 10 slices
    with mrcfile.open(labeled.label) as mrc:
        labels = canonical_labels(mrc.data.copy(), labeled.label)  # MRC keeps uint8 as int8
        assert np.isclose(float(mrc.voxel_size.x), 200.0)  # the image's voxel size
    assert (labels[[0, 1, 8, 9]] == IGNORE_VALUE).all()

    network = DoubleDecoderNet(width=4, outputs="label")
    network.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        soft = dihedral_mean(network.eval(), torch.from_numpy(standardise(data[4].astype(np.float32)))[None, None])
    expected = class_balanced_labels(soft[0, 0].numpy(), 0.2, 0.5)
    assert (labels[4] != expected).mean() < 0.01  # the teacher is the fused copy: ranks equal up to ties

    stamp = labeled.label.stat().st_mtime_ns
    write_pseudo_labels(weights, [tomogram], out, prior=0.2, keep=0.5)
    assert labeled.label.stat().st_mtime_ns == stamp  # same teacher and settings: reused
    write_pseudo_labels(weights, [tomogram], out, prior=0.2, keep=0.25)
    with mrcfile.open(labeled.label) as mrc:
        assert (canonical_labels(mrc.data[4], "x") == MEMBRANE).sum() < (
            labels[4] == MEMBRANE
        ).sum()  # other settings: made again


def test_adaptation_data_trains_on_pseudo_labels_only_when_semi_supervised(tmp_path: Path, weights: Path):
    from cryosxt_sim.simulate import main as simulate

    simulate(out=str(tmp_path / "source"), count=2, shape="10,48,48", seed=3, instrument="bessy")
    _tomogram(tmp_path / "new" / "a.mrc", np.random.default_rng(3).normal(size=(10, 48, 48)))
    source, _ = list_training_data(tmp_path / "source")
    prior = membrane_prior(slice_items(source))
    fractions = []
    for item in source:
        with mrcfile.open(item.label) as mrc:
            values = canonical_labels(mrc.data[item.annotated_slices], item.label)
            fractions.append((values == MEMBRANE).sum() / (values != IGNORE_VALUE).sum())
    assert prior == pytest.approx(float(np.median(fractions)))

    common = {"val_fraction": 0.5, "seed": 0, "init_weights": str(weights), "output_dir": str(tmp_path / "run")}
    plain = adaptation_data(tmp_path / "source", tmp_path / "new", semi_supervised=True, **common)
    self_trained = adaptation_data(
        tmp_path / "source", tmp_path / "new", semi_supervised=True, pseudo_labels=True, **common
    )
    control = adaptation_data(
        tmp_path / "source", tmp_path / "new", semi_supervised=False, pseudo_labels=True, **common
    )
    extra = [item for item in self_trained["train"] if item not in plain["train"]]
    assert [item["z"] for item in extra] == list(range(2, 8))
    assert all(item["image"] == str(tmp_path / "new" / "a.mrc") for item in extra)
    assert self_trained["val"] == plain["val"] and self_trained["pseudo_labeled"] == 6
    assert control["train"] == plain["train"] and not control["unlabeled"] and "pseudo_labeled" not in control
