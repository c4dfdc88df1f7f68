"""Tests of scripts.io.atomic, scripts.io.volume and scripts.io.readers on small real files."""

from __future__ import annotations

import os
import warnings

import mrcfile
import nibabel as nib
import numpy as np
import pytest
import tifffile
from monai.transforms import LoadImage, LoadImaged
from scripts.io.atomic import atomic_output
from scripts.io.readers import MrcReader, NiftiVolumeReader, TiffStackReader, VolumeReader
from scripts.io.volume import (
    IMOD_STAMP,
    SliceWriter,
    Volume,
    VolumeError,
    as_float_slice,
    find_volumes,
    open_volume,
    write_volume,
)

# Files written without a voxel size warn on opening; tests that expect the warning use pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*voxel size unknown")

VOX = (9.8, 9.81, 9.82)  # (z, y, x) nm, all different to catch axis swaps
DTYPES = ["uint8", "int8", "int16", "uint16", "float16", "float32"]
SUFFIXES = [".mrc", ".tif", ".nii", ".nii.gz"]


def sample(dtype: str, shape=(4, 6, 5), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.normal(size=shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)


def mrc_with_voxel(path, data, voxel_size_a) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size_a


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_shape_dtype_values_voxel_size(tmp_path, suffix, dtype):
    array = sample(dtype)
    path = write_volume(tmp_path / f"vol{suffix}", array, VOX)
    vol = open_volume(path)
    expected = np.float32 if (suffix.startswith(".nii") and dtype == "float16") else dtype  # NIfTI-1
    assert vol.dtype == expected
    assert vol.shape == array.shape
    np.testing.assert_array_equal(np.asarray(vol.data), array.astype(expected))
    assert vol.voxel_size_nm == pytest.approx(VOX, rel=1e-6)
    assert vol.path == path


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".nii"])
def test_uncompressed_files_are_memory_mapped(tmp_path, suffix):
    path = write_volume(tmp_path / f"v{suffix}", sample("float32"), VOX)
    assert isinstance(open_volume(path).data, np.memmap)


def test_uint8_mask_round_trips_exactly_through_mrc_mode_0(tmp_path):
    mask = np.zeros((3, 8, 8), np.uint8)
    mask[0, 2:4] = 1
    mask[1] = 255
    path = write_volume(tmp_path / "mask.mrc", mask, VOX)
    with mrcfile.open(path) as mrc:  # plain MRC readers see mode 0 (1 byte a voxel) with the IMOD stamp
        assert int(mrc.header.mode) == 0
        assert mrc.header.extra2.tobytes()[40:44] == b"IMOD"
        assert float(mrc.header.dmax) == 255.0 and float(mrc.header.dmin) == 0.0
    assert IMOD_STAMP == int.from_bytes(b"IMOD", "little")
    back = open_volume(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back.data, mask)


def test_bool_and_wide_int_choose_small_mrc_modes(tmp_path):
    assert open_volume(write_volume(tmp_path / "b.mrc", np.ones((2, 4, 4), bool))).dtype == np.uint8
    wide = np.full((2, 4, 4), -300, np.int64)
    assert open_volume(write_volume(tmp_path / "w.mrc", wide)).dtype == np.int16
    with pytest.raises(VolumeError, match="huge.mrc"):
        write_volume(tmp_path / "huge.mrc", np.full((2, 4, 4), 2**20, np.int64))


def test_like_copies_voxel_size_and_mrc_origin(tmp_path):
    src = tmp_path / "src.mrc"
    with mrcfile.new(src) as mrc:
        mrc.set_data(sample("float32"))
        mrc.voxel_size = (98.2, 98.1, 98.0)
        mrc.header.origin = (10.0, 20.0, 30.0)
    like = open_volume(src)
    assert like.voxel_size_nm == pytest.approx(VOX)
    assert like.origin_angstrom == (10.0, 20.0, 30.0)
    for suffix in (".mrc", ".nii"):
        out = open_volume(write_volume(tmp_path / f"out{suffix}", np.zeros(like.shape, np.uint8), like=like))
        assert out.voxel_size_nm == pytest.approx(VOX)
        assert out.origin_angstrom == pytest.approx((10.0, 20.0, 30.0))


def test_write_volume_accepts_a_volume_and_2d_arrays(tmp_path):
    vol = Volume(sample("float32"), VOX)
    back = open_volume(write_volume(tmp_path / "v.tif", vol))
    assert back.voxel_size_nm == pytest.approx(VOX)
    single = open_volume(write_volume(tmp_path / "s.mrc", sample("float32")[0]), allow_2d=True)
    assert single.shape == (1, 6, 5)
    assert as_float_slice(back, 1).dtype == np.float32 and as_float_slice(back, 1).flags.writeable


def test_tiff_has_imagej_metadata_for_fiji(tmp_path):
    path = write_volume(tmp_path / "mask.tif", sample("uint8"), VOX)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        meta = tif.imagej_metadata
        assert meta["unit"] == "nm" and meta["spacing"] == pytest.approx(9.8)
        assert meta["slices"] == 4
        xres, yres = tif.pages[0].resolution
        assert 1 / xres == pytest.approx(9.82) and 1 / yres == pytest.approx(9.81)


def test_non_imagej_dtypes_keep_calibration_in_standard_tags(tmp_path):
    path = write_volume(tmp_path / "v.tiff", sample("int16"), VOX)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_imagej
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER
    assert open_volume(path).voxel_size_nm == pytest.approx(VOX)


def test_compressed_tiff_round_trip(tmp_path):
    array = sample("uint16")
    path = write_volume(tmp_path / "c.tif", array, VOX, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    np.testing.assert_array_equal(open_volume(path).data, array)
    with pytest.raises(VolumeError, match="c.mrc"):
        write_volume(tmp_path / "c.mrc", array, compression="zlib")


def test_foreign_tiff_calibrations_convert_to_nm(tmp_path):
    array = sample("uint16")
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij,
        array,
        imagej=True,
        resolution=(1 / 0.0098, 1 / 0.0098),
        metadata={"spacing": 0.0196, "unit": "micron", "axes": "ZYX"},
    )
    assert open_volume(ij).voxel_size_nm == pytest.approx((19.6, 9.8, 9.8))
    ome = tmp_path / "ome.ome.tif"
    tifffile.imwrite(
        ome,
        array,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 98.0,
            "PhysicalSizeXUnit": "\u00c5",
            "PhysicalSizeY": 9.8,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.0098,
            "PhysicalSizeZUnit": "\u00b5m",
        },
    )
    assert open_volume(ome).voxel_size_nm == pytest.approx((9.8, 9.8, 9.8))
    plain = tmp_path / "plain.tif"
    with tifffile.TiffWriter(plain) as tw:  # separate pages, no metadata at all
        for page in array:
            tw.write(page, photometric="minisblack", metadata=None)
    with pytest.warns(UserWarning, match="plain.tif"):
        vol = open_volume(plain)
    assert vol.voxel_size_nm is None and vol.shape == array.shape
    np.testing.assert_array_equal(vol.data, array)


@pytest.mark.parametrize("bad_angstrom", [0.0, 1.0])
def test_mrc_voxel_size_of_0_or_1_angstrom_warns_and_is_missing(tmp_path, bad_angstrom):
    path = tmp_path / "tomo.rec"
    mrc_with_voxel(path, sample("float32"), bad_angstrom)
    with pytest.warns(UserWarning, match="tomo.rec"):
        assert open_volume(path).voxel_size_nm is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit voxel size silences the warning
        assert open_volume(path, voxel_size_nm=7.5).voxel_size_nm == (7.5, 7.5, 7.5)
    assert open_volume(path, voxel_size_nm=(20, 10, 10)).voxel_size_nm == (20.0, 10.0, 10.0)


def test_override_beats_a_valid_header(tmp_path):
    path = write_volume(tmp_path / "v.mrc", sample("float32"), VOX)
    assert open_volume(path, voxel_size_nm=3).voxel_size_nm == (3.0, 3.0, 3.0)
    with pytest.raises(VolumeError, match="v.mrc"):
        open_volume(path, voxel_size_nm=-1)


def test_nifti_axes_and_units(tmp_path):
    xyz = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (x, y, z) as NIfTI stores it
    img = nib.Nifti1Image(xyz, np.diag([0.002, 0.003, 0.004, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "n.nii.gz")
    vol = open_volume(tmp_path / "n.nii.gz")
    assert vol.shape == (4, 3, 2)
    np.testing.assert_array_equal(vol.data, xyz.transpose(2, 1, 0))
    assert vol.voxel_size_nm == pytest.approx((4.0, 3.0, 2.0))
    nib.save(nib.Nifti1Image(xyz[..., None], np.eye(4)), tmp_path / "t.nii")  # (x, y, z, 1), unset zooms
    with pytest.warns(UserWarning, match="t.nii"):
        vol = open_volume(tmp_path / "t.nii")
    assert vol.shape == (4, 3, 2) and vol.voxel_size_nm is None


# ----------------------------------------------------------------------------- errors


def assert_names(err: pytest.ExceptionInfo, path) -> None:
    assert str(path) in str(err.value)


def test_corrupt_and_truncated_mrc_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mrc"
    corrupt.write_bytes(os.urandom(2048))
    with pytest.raises(VolumeError) as err:
        open_volume(corrupt)
    assert_names(err, corrupt)
    good = write_volume(tmp_path / "good.mrc", sample("float32", (8, 16, 16)), VOX)
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(VolumeError, match="truncated") as err:
        open_volume(truncated)
    assert_names(err, truncated)
    short = tmp_path / "short.mrc"
    short.write_bytes(good.read_bytes()[:300])  # not even a whole header
    with pytest.raises(VolumeError) as err:
        open_volume(short)
    assert_names(err, short)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(VolumeError) as err:
        open_volume(tmp_path / "nope.mrc")
    assert_names(err, tmp_path / "nope.mrc")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(VolumeError, match="a.png"):
        open_volume(tmp_path / "a.png")
    with pytest.raises(VolumeError, match="b.h5"):
        write_volume(tmp_path / "b.h5", sample("uint8"))


@pytest.mark.parametrize("suffix", [".tif", ".mrc", ".nii"])
def test_2d_file_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"slice{suffix}"
    image = sample("uint16", (6, 5))
    if suffix == ".tif":
        tifffile.imwrite(path, image)
    elif suffix == ".mrc":
        with mrcfile.new(path) as mrc:
            mrc.set_data(image)
    else:
        nib.save(nib.Nifti1Image(image.T, np.eye(4)), path)
    with pytest.raises(VolumeError, match="2D") as err:
        open_volume(path)
    assert_names(err, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # voxel size of these files is unset
        vol = open_volume(path, allow_2d=True)
    assert vol.shape == (1, 6, 5)
    np.testing.assert_array_equal(vol.data[0], image)


def test_4d_files_refused_singletons_squeezed(tmp_path):
    four = tmp_path / "four.tif"
    tifffile.imwrite(four, sample("uint8", (2, 3, 6, 5)), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(VolumeError, match="4D") as err:
        open_volume(four)
    assert_names(err, four)
    nii = tmp_path / "four.nii"
    nib.save(nib.Nifti1Image(sample("uint8", (5, 6, 3, 2)), np.eye(4)), nii)
    with pytest.raises(VolumeError, match="4D") as err:
        open_volume(nii)
    assert_names(err, nii)
    stack = tmp_path / "stack.mrcs"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(sample("float32", (1, 4, 6, 5)))  # a volume stack holding one volume
        mrc.voxel_size = 98.0
    assert open_volume(stack).shape == (4, 6, 5)


def test_rgb_tiff_refused(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, sample("uint8", (3, 6, 5, 3)), photometric="rgb")
    with pytest.raises(VolumeError, match="RGB") as err:
        open_volume(path)
    assert_names(err, path)


def test_nan_in_tomogram_refused_with_slice_count(tmp_path):
    data = sample("float32", (6, 8, 8))
    data[1, 2, 3] = np.nan
    data[4, 0, 0] = np.inf
    path = tmp_path / "nan.mrc"
    with mrcfile.new(path) as mrc, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN itself
        mrc.set_data(data)
        mrc.voxel_size = 98.0
    with pytest.raises(VolumeError, match="2 of 6 slices") as err:
        open_volume(path)
    assert_names(err, path)
    assert open_volume(path, check_finite=False).shape == data.shape  # header-only opening still works


def test_find_volumes(tmp_path):
    for name in ["b.MRC", "a.nii.gz", "c.tiff", "d.rec", ".hidden.mrc", ".x.partial-ab12.mrc", "e.txt", "f.slices.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.mrc").mkdir()
    assert [p.name for p in find_volumes(tmp_path)] == ["a.nii.gz", "b.MRC", "c.tiff", "d.rec"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError) as err:
        find_volumes(empty)
    assert_names(err, empty)
    with pytest.raises(VolumeError) as err:
        find_volumes(tmp_path / "missing")
    assert_names(err, tmp_path / "missing")


# ----------------------------------------------------------------------------- atomic output


def test_atomic_output_keeps_suffix_and_cleans_up(tmp_path):
    target = tmp_path / "mask.nii.gz"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".mask.partial-") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"new"  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["mask.nii.gz"]


# ----------------------------------------------------------------------------- SliceWriter


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".nii"])
def test_slice_writer_gives_the_same_file_as_write_volume(tmp_path, suffix):
    array = sample("uint8", (5, 12, 10))
    reference = write_volume(tmp_path / f"ref{suffix}", array, VOX)
    streamed = tmp_path / f"streamed{suffix}"
    with SliceWriter(streamed, array.shape, np.uint8, VOX) as writer:
        for z in (3, 4, 0, 1, 2):  # any order, one slice at a time
            writer.write(z, array[z])
            assert not streamed.exists()
    assert streamed.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([reference.name, streamed.name])


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".nii.gz"])
def test_slice_writer_leaves_nothing_on_error(tmp_path, suffix):
    with pytest.raises(KeyError), SliceWriter(tmp_path / f"out{suffix}", (4, 8, 8), np.float32) as writer:
        writer.write(0, np.ones((2, 8, 8)))
        raise KeyError("model crashed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(VolumeError, match="2 of 4 slices"):
        with SliceWriter(tmp_path / f"out{suffix}", (4, 8, 8), np.float32) as writer:
            writer.write(0, np.ones((2, 8, 8)))
    assert os.listdir(tmp_path) == []


def test_slice_writer_checks_blocks(tmp_path):
    with SliceWriter(tmp_path / "m.mrc", (4, 8, 8), np.uint8) as writer:
        with pytest.raises(VolumeError, match="does not fit"):
            writer.write(3, np.zeros((2, 8, 8), np.uint8))
        with pytest.raises(VolumeError, match="refusing"):
            writer.write(0, np.zeros((4, 8, 8), np.float32))
        with pytest.raises(VolumeError, match="do not fit"):
            writer.write(0, np.full((4, 8, 8), 300, np.int32))
        writer.write(0, np.ones((4, 8, 8), bool))
    np.testing.assert_array_equal(open_volume(tmp_path / "m.mrc", check_finite=False).data, 1)


def test_big_uint8_mask_streams_through_mrc_memmap(tmp_path):
    shape = (64, 512, 512)
    rng = np.random.default_rng(1)
    path = tmp_path / "big.mrc"
    expected = np.empty(shape, np.uint8)
    with SliceWriter(path, shape, np.uint8, VOX) as writer:
        for z0 in range(0, shape[0], 16):
            block = rng.integers(0, 256, size=(16, *shape[1:]), dtype=np.uint8)
            expected[z0 : z0 + 16] = block
            writer.write(z0, block)
    assert path.stat().st_size == 1024 + expected.nbytes  # one byte a voxel
    back = open_volume(path)
    assert back.dtype == np.uint8 and back.voxel_size_nm == pytest.approx(VOX)
    np.testing.assert_array_equal(back.data, expected)


# ----------------------------------------------------------------------------- MONAI readers


def test_load_image_with_mrc_reader_returns_array_and_spacing(tmp_path):
    array = sample("float32")
    path = write_volume(tmp_path / "t.mrc", array, VOX)
    img = LoadImage(reader=MrcReader(), image_only=True)(path)
    np.testing.assert_allclose(img.numpy(), array)
    np.testing.assert_allclose(img.meta["spacing"], VOX, rtol=1e-6)
    np.testing.assert_allclose(img.meta["pixdim"], VOX, rtol=1e-6)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], VOX, rtol=1e-6)
    assert img.meta["filename_or_obj"] == str(path)
    chan = LoadImage(reader=MrcReader, ensure_channel_first=True, image_only=True)(str(path))
    assert tuple(chan.shape) == (1, *array.shape)


def test_load_imaged_and_reader_lists(tmp_path):
    array = sample("uint16")
    tif = write_volume(tmp_path / "t.tif", array, VOX)
    mrc = write_volume(tmp_path / "m.mrc", array, VOX)
    out = LoadImaged(keys="image", reader=TiffStackReader(), image_only=True)({"image": str(tif)})
    np.testing.assert_array_equal(out["image"].numpy(), array)
    np.testing.assert_allclose(out["image"].meta["spacing"], VOX, rtol=1e-6)
    both = LoadImage(reader=[MrcReader(), TiffStackReader()], image_only=True)
    for path in (tif, mrc):
        np.testing.assert_array_equal(both(path).numpy(), array)


def test_readers_claim_only_their_suffixes_and_raise_on_others(tmp_path):
    tif = write_volume(tmp_path / "t.tif", sample("uint8"), VOX)
    assert MrcReader().verify_suffix("a.REC") and not MrcReader().verify_suffix("a.tif")
    assert TiffStackReader().verify_suffix(["a.tif", "b.TIFF"])
    assert not TiffStackReader().verify_suffix("a.mrc")
    assert NiftiVolumeReader().verify_suffix("a.nii.gz") and VolumeReader().verify_suffix("a.st")
    with pytest.raises(VolumeError, match="t.tif"):
        MrcReader().read(tif)


def test_reader_stacks_a_list_and_reports_missing_voxel_size(tmp_path):
    a = write_volume(tmp_path / "a.mrc", sample("uint8"))
    b = write_volume(tmp_path / "b.mrc", sample("uint8", seed=1))
    reader = MrcReader()
    with pytest.warns(UserWarning):
        data, meta = reader.get_data(reader.read([a, b]))
    assert data.shape == (2, 4, 6, 5) and meta["original_channel_dim"] == 0
    assert not meta["voxel_size_known"] and np.isnan(meta["spacing"]).all()
