"""Command-line strings become typed values in one place (scripts.options, scripts.surfaces.options)."""

import pytest
from scripts.options import as_bool, as_names, as_optional, as_range, as_voxel_size, parse_slice_ranges
from scripts.surfaces.options import MeshOptions, SurfaceOptions


def test_strings_from_the_command_line_become_typed_values():
    values = ("false", "True", " on ", "0", "", 1)
    assert [as_bool(v, "tta") for v in values] == [False, True, True, False, False, True]
    with pytest.raises(ValueError, match="tta must be true or false"):
        as_bool("maybe", "tta")
    assert as_optional("null") is None and as_optional("None") is None and as_optional("uint8") == "uint8"
    assert as_voxel_size("[20, 9.8, 9.8]") == (20.0, 9.8, 9.8) and as_voxel_size("9.8") == 9.8
    assert as_voxel_size("null") is None
    with pytest.raises(ValueError, match="voxel_size_nm"):
        as_voxel_size("[1, 2]")
    assert as_range("[1, 6]", "slice_range") == (1, 6) and as_range([0, 3], "slice_range") == (0, 3)
    assert as_range(None, "slice_range") is None
    assert as_names("ply; .STL,ply", "mesh format") == ["ply", "stl"] and as_names("[glb]", "f") == ["glb"]
    assert parse_slice_ranges(["3", "5-7"], 10) == [3, 5, 6, 7]
    with pytest.raises(ValueError, match="outside slices 0..9"):
        parse_slice_ranges(["8-12"], 10)


def test_surface_options_are_built_from_flat_settings_and_typed():
    options = SurfaceOptions.from_settings(
        min_voxels="20", z_closing="OR", formats="glb,ply", per_object_meshes="false",
        pictures={"render_3d": "false"}, voxel_size_nm="[20,9.8,9.8]", save_labels="no",
    )  # fmt: skip
    assert options.objects.min_voxels == 20 and options.objects.z_closing == "or"
    assert options.meshes == MeshOptions(formats=("glb", "ply"), per_object_meshes=False)
    assert options.pictures.render_3d is False and options.pictures.montage_slices == 12
    assert options.voxel_size_nm == (20.0, 9.8, 9.8) and options.save_labels is False
    with pytest.raises(ValueError, match="unknown mesh format 'step'"):
        SurfaceOptions.from_settings(formats=["step"])
    with pytest.raises(TypeError):
        SurfaceOptions.from_settings(min_voxel=3)  # a misspelt setting is not ignored
