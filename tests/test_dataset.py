"""Tests of scripts.train.dataset: folder layout, annotated slices, splits."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.io.volume import VolumeError, write_volume
from scripts.train.dataset import (
    LabeledVolume,
    list_training_data,
    read_slice_list,
    slice_items,
    slice_items_unlabeled,
    split_by_file,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*voxel size unknown")

SHAPE = (6, 16, 16)


def image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label(annotated: list[int], shape=SHAPE) -> np.ndarray:
    """All-255 (unannotated) except the given slices, which get background and some membrane."""
    lab = np.full(shape, 255, np.uint8)
    for z in annotated:
        lab[z] = 0
        lab[z, 4:6] = 1
    return lab


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "D"
    write_volume(root / "images" / "a.mrc", image(0), 9.8)
    write_volume(root / "labels" / "a.tif", label([0, 2, 5]))  # another suffix, same stem
    write_volume(root / "images" / "b.tif", image(1), 9.8)
    write_volume(root / "labels" / "b.mrc", label([1, 2, 3, 4]))
    (root / "labels" / "b.slices.txt").write_text("# annotated by hand\n1\n3-5\n")  # 5 is all-255
    write_volume(root / "images" / "c.nii.gz", image(2), 9.8)  # no label: unlabeled
    write_volume(root / "unlabeled" / "u.rec", image(3, (3, 16, 16)), 9.8)
    (root / "unlabeled" / ".u.partial-1234.rec").write_bytes(b"half written")
    return root


def test_layout_labeled_and_unlabeled(dataset):
    labeled, unlabeled = list_training_data(dataset)
    assert labeled == [
        LabeledVolume(dataset / "images" / "a.mrc", dataset / "labels" / "a.tif", [0, 2, 5]),
        LabeledVolume(dataset / "images" / "b.tif", dataset / "labels" / "b.mrc", [1, 3, 4]),
    ]
    assert unlabeled == [dataset / "images" / "c.nii.gz", dataset / "unlabeled" / "u.rec"]


def test_slice_items(dataset):
    labeled, unlabeled = list_training_data(dataset)
    items = slice_items(labeled)
    assert len(items) == 6
    first = {"image": str(dataset / "images" / "a.mrc"), "label": str(dataset / "labels" / "a.tif"), "z": 0}
    assert items[0] == first
    assert [it["z"] for it in items] == [0, 2, 5, 1, 3, 4]
    free = slice_items_unlabeled(unlabeled)
    assert len(free) == 6 + 3 and free[-1] == {"image": str(dataset / "unlabeled" / "u.rec"), "z": 2}


def test_label_shape_mismatch_names_both_files(dataset):
    write_volume(dataset / "labels" / "c.mrc", label([0], (6, 16, 8)))
    with pytest.raises(VolumeError) as err:
        list_training_data(dataset)
    msg = str(err.value)
    assert "c.mrc" in msg and "c.nii.gz" in msg and "(6, 16, 8)" in msg and "(6, 16, 16)" in msg


def test_label_without_image_and_duplicate_stems(dataset):
    write_volume(dataset / "labels" / "zz.mrc", label([0]))
    with pytest.raises(VolumeError, match="zz.mrc"):
        list_training_data(dataset)
    (dataset / "labels" / "zz.mrc").unlink()
    write_volume(dataset / "labels" / "a.mrc", label([0]))
    with pytest.raises(VolumeError, match="a.mrc"):
        list_training_data(dataset)


def test_fully_unannotated_label_makes_the_image_unlabeled(dataset):
    write_volume(dataset / "labels" / "c.nii.gz", label([]))
    with pytest.warns(UserWarning, match="c.nii.gz"):
        labeled, unlabeled = list_training_data(dataset)
    assert len(labeled) == 2 and dataset / "images" / "c.nii.gz" in unlabeled


def test_empty_or_missing_dataset_is_an_error(tmp_path):
    (tmp_path / "D" / "images").mkdir(parents=True)
    with pytest.raises(VolumeError) as err:
        list_training_data(tmp_path / "D")
    assert str(tmp_path / "D") in str(err.value)
    with pytest.raises(VolumeError, match="nowhere"):
        list_training_data(tmp_path / "nowhere")


def test_unlabeled_only_dataset(tmp_path):
    write_volume(tmp_path / "unlabeled" / "u.mrc", image(), 9.8)
    assert list_training_data(tmp_path) == ([], [tmp_path / "unlabeled" / "u.mrc"])


def test_sidecar_parsing(tmp_path):
    side = tmp_path / "x.slices.txt"
    side.write_text("0, 2-4\n\n7 # last\n")
    assert read_slice_list(side, 8) == [0, 2, 3, 4, 7]
    side.write_text("9\n")
    with pytest.raises(VolumeError, match="x.slices.txt"):
        read_slice_list(side, 8)
    side.write_text("two\n")
    with pytest.raises(VolumeError, match="x.slices.txt"):
        read_slice_list(side, 8)


def test_split_by_file_is_reproducible_and_keeps_one_val():
    items = [f"vol{i}" for i in range(25)]
    train, val = split_by_file(items, 0.1, seed=3)
    assert (train, val) == split_by_file(items, 0.1, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(items) and not set(train) & set(val)
    assert split_by_file(items, 0.1, seed=4) != (train, val)
    assert [len(x) for x in split_by_file(["a", "b"], 0.1)] == [1, 1]
    assert split_by_file(["a"], 0.5) == (["a"], [])
    assert split_by_file(items, 0.0) == (items, [])
