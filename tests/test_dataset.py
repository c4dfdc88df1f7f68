"""Tests of scripts.train.dataset: folder layout, annotated slices, splits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scripts.io.labels import LabelError
from scripts.io.volume import VolumeError, open_volume, write_volume
from scripts.train.dataset import (
    LabeledVolume,
    annotated_slices,
    list_training_data,
    read_slice_list,
    slice_items,
    slice_items_unlabeled,
    split_by_file,
)
from scripts.train.slices import LoadSliced

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


# ----------------------------------------------------------------------------- label values


def _monailabel_training_data():
    """monailabel/lib/training_data.py, imported by path (the app's ``lib`` is not a package here)."""
    path = Path(__file__).resolve().parents[1] / "monailabel" / "lib" / "training_data.py"
    spec = importlib.util.spec_from_file_location("cryosxt_monailabel_training_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int8_mode0_mrc_label_reads_the_same_everywhere(tmp_path):
    """A mode-0 MRC label without IMOD's unsigned flag is int8 to mrcfile: 255 reads as -1."""
    lab = np.full(SHAPE, -1, np.int8)  # the bytes of 255: not annotated
    lab[1] = 0
    lab[1, 4:6] = 1
    path = tmp_path / "D" / "labels" / "a.mrc"
    path.parent.mkdir(parents=True)
    with mrcfile.new(path) as mrc:
        mrc.set_data(lab)
    write_volume(tmp_path / "D" / "images" / "a.mrc", image(0), 9.8)
    data = open_volume(path, check_finite=False).data
    assert data.dtype == np.int8  # the case under test: no unsigned flag in the file

    assert annotated_slices(data) == [1]
    labeled, _ = list_training_data(tmp_path / "D")
    assert [item.annotated_slices for item in labeled] == [[1]]
    item = {"image": str(tmp_path / "D" / "images" / "a.mrc"), "label": str(path)}
    loaded = LoadSliced()({**item, "z": 1})
    assert loaded["mask"].min() == 1 and int((loaded["label"] > 0).sum()) == 2 * SHAPE[2]
    assert LoadSliced()({**item, "z": 2})["mask"].max() == 0
    td = _monailabel_training_data()
    assert td.scan_label(data, path) == (True, [1])


@pytest.mark.parametrize(
    ("value", "dtype", "shown"),
    [(7, np.uint8, "7"), (128, np.uint8, "128"), (2, np.uint16, "2"), (0.5, np.float32, "0.5")],
)
def test_label_values_other_than_0_1_255_are_refused_naming_the_file(dataset, value, dtype, shown):
    lab = label([0, 3]).astype(dtype)
    lab[3, 10:12] = value  # e.g. a second class of a multi-class label map
    write_volume(dataset / "labels" / "c.tif", lab)
    with pytest.raises(LabelError) as err:
        list_training_data(dataset)
    msg = str(err.value)
    assert msg.startswith(f"{dataset / 'labels' / 'c.tif'}: label values {shown} (first at slice z=3)")
    assert "membrane = 1, not annotated = 255, background = 0" in msg and "several classes" in msg
    assert isinstance(err.value, VolumeError)  # handled like every other bad input


def test_every_bad_value_is_named_across_slabs_and_sidecars_limit_the_check(tmp_path, monkeypatch):
    import scripts.io.labels
    from scripts.io.volume import iter_slabs

    # one slice per slab, as in a tomogram larger than the slab budget
    def one_slice_per_slab(n: int, nbytes: int):
        return iter_slabs(n, nbytes, budget=nbytes)

    monkeypatch.setattr(scripts.io.labels, "iter_slabs", one_slice_per_slab)
    lab = label([0, 1, 2, 3, 4, 5])
    lab[1, 0, 0], lab[5, 0, 0] = 3, 9  # classes in two slabs far apart
    assert annotated_slices(label([2, 4])) == [2, 4]
    with pytest.raises(LabelError, match=r"big.mrc: label values 3, 9 \(first at slice z=1\)"):
        annotated_slices(lab, path="big.mrc")
    assert annotated_slices(lab, [0, 2, 3], path="big.mrc") == [0, 2, 3]  # unlisted slices are unused
    with pytest.raises(LabelError, match="big.mrc: label values 9 "):
        annotated_slices(lab, [0, 5], path="big.mrc")
    td = _monailabel_training_data()
    write_volume(tmp_path / "classes.nii.gz", lab)
    with pytest.raises(LabelError, match=r"classes.nii.gz: label values 3, 9"):
        td.open_label(tmp_path / "classes.nii.gz")
